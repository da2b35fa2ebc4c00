"""A job left at "auto" shows "auto" until a worker has tokenized its training file; then the job
records what the worker trains with, and an event says what "auto" became and from what."""

import io
import json

import pytest
from openai.types.fine_tuning import FineTuningJob

from app.core.db import get_sessionmaker
from app.core.settings import EMBEDDED_BASE_MODEL
from app.core.storage import open_store
from app.models import Model
from app.schemas import JobCreate, JobPublic
from app.services import files, jobs, keys
from tests.conftest import link_base_model
from tests.worker_support import ARITHMETIC, events, get_job, wait_for, worker_thread


def public(job) -> dict:
    body = JobPublic.model_validate(job).model_dump(mode="json")
    FineTuningJob.model_validate(body)  # OpenAI's job object, "auto" included
    return body


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_worker_resolves_auto_from_the_tokens_and_records_it(settings, base_model_dir):
    link_base_model(settings.data_dir, base_model_dir)
    rows = ARITHMETIC[:3]
    with get_sessionmaker()() as s:
        tenant = keys.get_or_create_tenant(s, "acme")
        s.commit()
        upload = io.BytesIO("".join(json.dumps(row) + "\n" for row in rows).encode())
        f = files.store_file(
            s, settings, open_store(settings), tenant, upload=upload, filename="t.jsonl", purpose="fine-tune"
        )
        body = JobCreate(model=EMBEDDED_BASE_MODEL, training_file=f.id, hyperparameters={"n_epochs": 1})
        job, _ = jobs.create_job(s, settings, tenant, body)
        queued = public(job)
    assert queued["hyperparameters"]["batch_size"] == "auto"
    assert queued["hyperparameters"]["learning_rate_multiplier"] == "auto"
    assert queued["method"]["supervised"]["hyperparameters"]["n_epochs"] == 1

    with worker_thread(settings, poll_seconds=0.1):
        wait_for(lambda: get_job(job.id).status in ("succeeded", "failed"), timeout=120, message="the job")
    done = get_job(job.id)
    assert done.status == "succeeded", done.error
    hyperparameters = public(done)["hyperparameters"]
    assert (hyperparameters["batch_size"], hyperparameters["n_epochs"]) == (1, 1)
    assert hyperparameters["learning_rate_multiplier"] == 1.0
    assert hyperparameters["learning_rate"] == pytest.approx(2e-4)
    # The published adapter's manifest records them too, not "auto".
    with get_sessionmaker()() as s:
        model = s.get(Model, done.output_model)
        manifest = json.loads((settings.data_dir / model.path / "manifest.json").read_text())
    assert manifest["hyperparameters"]["batch_size"] == 1

    [resolved] = [e for e in events(job.id) if e.message.startswith("Hyperparameters:")]
    assert resolved.data["batch_size"] == 1 and resolved.data["learning_rate_multiplier"] == 1.0
    assert "n_epochs" not in resolved.data  # given, not "auto"
    assert resolved.data["examples"] == 3 and resolved.data["tokens"] > 3 * 3
    assert "batch_size=1" in resolved.message and "3 examples" in resolved.message
