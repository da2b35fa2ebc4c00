from app.models import Checkpoint, Job, Model
from app.schemas import CheckpointPublic, ModelPublic


def test_checkpoint_is_served_under_its_fine_tune_with_step_first_in_its_numeric_metrics():
    job = Job(id="ftjob-1", output_model="ft:base:acme::x")
    row = Checkpoint(
        id="ftckpt-1", job_id=job.id, job=job, step=10, created_at=5, metrics={"train_loss": 1, "note": "x"}
    )
    public = CheckpointPublic.model_validate(row)
    assert public.fine_tuned_model_checkpoint == "ft:base:acme::x:ckpt-step-10"
    assert public.fine_tuning_job_id == "ftjob-1" and public.step_number == 10
    assert list(public.metrics.items()) == [("step", 10.0), ("train_loss", 1.0)]


def test_a_checkpoints_parent_is_its_fine_tune_and_a_fine_tunes_is_its_base():
    def model(model_id, kind):
        return Model(id=model_id, kind=kind, tenant_id="org-1", base_model="base", created_at=5)

    checkpoint = ModelPublic.model_validate(model("ft:base:acme::x:ckpt-step-10", "checkpoint"))
    assert checkpoint.parent == "ft:base:acme::x" and checkpoint.owned_by == "org-1"
    assert ModelPublic.model_validate(model("ft:base:acme::x", "fine_tune")).parent == "base"
    assert ModelPublic(id="base", created=1, owned_by="system").parent is None
