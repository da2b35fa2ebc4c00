from app.models import JobEvent
from app.schemas import JobEventPublic


def event(data):
    return JobEvent(id=7, created_at=1, level="info", message="m", data=data)


def test_step_metrics_are_metrics_events_with_their_data():
    public = JobEventPublic.model_validate(event({"step": 5, "train_loss": 1.5, "learning_rate": 2e-4}))
    assert public.type == "metrics" and public.data["train_loss"] == 1.5
    assert public.id == "ftevent-7" and public.object == "fine_tuning.job.event"


def test_lifecycle_events_stay_messages_even_with_data():
    assert JobEventPublic.model_validate(event({"attempt": 1, "worker_id": "w"})).type == "message"
    assert JobEventPublic.model_validate(event(None)).type == "message"
