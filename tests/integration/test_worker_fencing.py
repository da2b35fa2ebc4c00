"""Claims follow the shared status semantics, and a zombie whose lease was taken over can write
nothing: not status, not events, not checkpoints, not the model."""

import time
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from app.core.artifacts import WEIGHTS_FILE
from app.core.db import get_engine, session_scope
from app.core.storage import open_store
from app.models import Checkpoint, JobEvent, Model
from tests.worker_support import ARITHMETIC, create_file, create_job, create_tenant, get_job, update_job
from worker import store
from worker.errors import JobLost
from worker.fence import Fence
from worker.loop import claim_job


@pytest.fixture
def sessions(settings):
    return sessionmaker(get_engine(), expire_on_commit=False)


def noop_adapter(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / WEIGHTS_FILE).write_bytes(b"zombie weights")
    (directory / "adapter_config.json").write_text("{}")


def test_claim_takes_only_due_queued_jobs_and_stalled_ones(settings, sessions):
    tenant = create_tenant()
    training_file = create_file(settings, tenant, ARITHMETIC[:1], "prompt_completion")
    later = create_job(tenant, training_file)
    update_job(later, run_after=time.time() + 3600)
    for status in ("paused", "cancelled", "succeeded"):
        update_job(create_job(tenant, training_file), status=status)
    healthy = create_job(tenant, training_file)
    update_job(healthy, status="running", attempt=1, lease_expires_at=time.time() + 3600)
    stalled = create_job(tenant, training_file)
    update_job(stalled, status="running", attempt=1, worker_id="dead", lease_expires_at=time.time() - 1)

    claimed = claim_job(sessions, "w1", settings)
    assert claimed.id == stalled and claimed.attempt == 2 and claimed.infra_failures == 1
    job = get_job(stalled)
    assert job.status == "running" and job.worker_id == "w1" and job.lease_expires_at > time.time()
    assert claim_job(sessions, "w1", settings) is None


def test_job_whose_worker_keeps_dying_fails_after_max_attempts(settings, sessions):
    tenant = create_tenant()
    job_id = create_job(tenant, create_file(settings, tenant, ARITHMETIC[:1], "prompt_completion"))
    update_job(job_id, status="running", attempt=3, infra_failures=2, lease_expires_at=time.time() - 1)
    assert claim_job(sessions, "w1", settings.model_copy(update={"max_attempts": 3})) is None
    job = get_job(job_id)
    assert job.status == "failed" and job.error["code"] == "worker_lost"


def test_zombie_cannot_write_after_takeover(store_settings, sessions):
    """On both artifact stores: the zombie publishes nothing, neither rows nor objects."""
    settings, artifacts = store_settings, open_store(store_settings)
    tenant = create_tenant()
    job_id = create_job(tenant, create_file(settings, tenant, ARITHMETIC[:1], "prompt_completion"))
    zombie_job = claim_job(sessions, "zombie", settings)
    zombie = Fence(sessions, job_id, zombie_job.attempt)
    zombie.event("still alive")
    update_job(job_id, lease_expires_at=time.time() - 1)  # its heartbeat stopped
    owner_job = claim_job(sessions, "owner", settings)
    assert owner_job.attempt == zombie_job.attempt + 1
    with session_scope() as session:
        events_before = session.scalar(select(func.count()).select_from(JobEvent))

    with pytest.raises(JobLost):
        zombie.event("I am still training", data={"step": 99})
    with pytest.raises(JobLost):
        zombie.event("done", status="succeeded", fine_tuned_model=zombie_job.output_model)
    with pytest.raises(JobLost):
        store.save_checkpoint(
            artifacts,
            zombie,
            zombie_job,
            5,
            lambda d: (noop_adapter(d / "adapter"), (d / "state").mkdir()),
            {"step": 5},
            keep_checkpoints=3,
        )
    with pytest.raises(JobLost):
        store.publish_adapter(artifacts, zombie, zombie_job, noop_adapter, trained_tokens=10)

    job = get_job(job_id)
    assert job.status == "running" and job.worker_id == "owner" and job.fine_tuned_model is None
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(JobEvent)) == events_before
        assert session.scalar(select(func.count()).select_from(Model)) == 0
        assert session.scalar(select(func.count()).select_from(Checkpoint)) == 0
    assert list(artifacts.list_objects("jobs/")) == list(artifacts.list_objects("adapters/")) == []
    assert not list((settings.data_dir / "jobs" / job_id).glob(".tmp-*"))

    owner = Fence(sessions, job_id, owner_job.attempt)
    store.publish_adapter(artifacts, owner, owner_job, noop_adapter, trained_tokens=10)
    assert get_job(job_id).status == "succeeded"
