"""Cancel and pause/resume of a job that the real recipe is training."""

import pytest
from sqlalchemy import select

from app.core.db import session_scope
from app.models import Checkpoint, Model
from tests.conftest import link_base_model
from tests.worker_support import (
    ARITHMETIC,
    create_file,
    create_job,
    create_tenant,
    events,
    get_job,
    metric_steps,
    update_job,
    wait_for,
    worker_thread,
)

pytestmark = pytest.mark.slow  # every test here trains a model

FAST = {"heartbeat_seconds": 0.2, "poll_seconds": 0.1, "checkpoint_every_steps": 1000}


def long_job(settings, base_model_dir):
    link_base_model(settings.data_dir, base_model_dir)
    tenant = create_tenant()
    training_file = create_file(settings, tenant, ARITHMETIC, "prompt_completion")
    return create_job(tenant, training_file, n_epochs=1, target_modules=["q_proj", "v_proj"])


def test_cancel_stops_training_and_publishes_nothing(settings, base_model_dir):
    job_id = long_job(settings, base_model_dir)
    with worker_thread(settings, **FAST):
        wait_for(lambda: metric_steps(job_id), timeout=60, message="training to start")
        update_job(job_id, status="cancelled")
        wait_for(
            lambda: any("cancelled" in e.message for e in events(job_id)),
            timeout=30,
            message="the worker to stop",
        )
        steps = metric_steps(job_id)
    assert get_job(job_id).status == "cancelled"
    assert max(steps) < 16
    assert metric_steps(job_id) == steps
    with session_scope() as session:
        assert session.scalars(select(Model).where(Model.kind == "fine_tune")).all() == []
    assert not list(settings.data_dir.joinpath("jobs", job_id).glob(".tmp-*"))


def test_pause_checkpoints_and_resume_continues_from_that_step(settings, base_model_dir):
    job_id = long_job(settings, base_model_dir)
    with worker_thread(settings, **FAST):
        wait_for(lambda: metric_steps(job_id), timeout=60, message="training to start")
        update_job(job_id, pause_requested=True)
        wait_for(lambda: get_job(job_id).status == "paused", timeout=30, message="the job to pause")
        paused = get_job(job_id)
        assert paused.pause_requested is False and paused.lease_expires_at is None
        with session_scope() as session:
            checkpoint = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)).one()
        paused_at = checkpoint.step
        assert (settings.data_dir / checkpoint.path / "state" / "optimizer.safetensors").is_file()
        assert max(metric_steps(job_id)) <= paused_at

        update_job(job_id, status="queued")  # what the API's resume does
        wait_for(lambda: get_job(job_id).status == "succeeded", timeout=240, message="the job to finish")
    resumed = [e for e in events(job_id) if e.data and "resumed_from_step" in e.data]
    assert [e.data["resumed_from_step"] for e in resumed] == [paused_at]
    after = [s for s in metric_steps(job_id) if s > paused_at]
    assert after and after[-1] == 16
    assert get_job(job_id).attempt == 2
