"""Real `python -m worker` processes: kill -9 and reclaim, SIGTERM, a crash while publishing (on
both artifact stores)."""

import signal

import pytest
from sqlalchemy import select

from app.core.db import session_scope
from app.core.storage import open_store
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
    quick_lease,
    start_worker_process,
    wait_for,
)


def checkpoint_steps(job_id):
    with session_scope() as session:
        return sorted(session.scalars(select(Checkpoint.step).where(Checkpoint.job_id == job_id)))


def training_job(settings, base_model_dir):
    link_base_model(settings.data_dir, base_model_dir)
    tenant = create_tenant()
    training_file = create_file(settings, tenant, ARITHMETIC, "prompt_completion")
    return create_job(tenant, training_file, target_modules=["q_proj", "v_proj"])


def test_killed_worker_job_is_reclaimed_and_resumed_from_checkpoint(settings, base_model_dir, tmp_path):
    job_id = training_job(settings, base_model_dir)
    env = quick_lease(TUNEFORGE_CHECKPOINT_EVERY_STEPS=4)
    first = start_worker_process(tmp_path / "first.log", **env)
    try:
        wait_for(lambda: checkpoint_steps(job_id), timeout=120, message="a checkpoint")
        second = start_worker_process(tmp_path / "second.log", **env)
        first.send_signal(signal.SIGKILL)
        first.wait()
        killed_at = max(checkpoint_steps(job_id))
        wait_for(
            lambda: get_job(job_id).status in ("succeeded", "failed"),
            timeout=180,
            message="the job to finish",
        )
    finally:
        first.kill()
        if "second" in locals():
            second.send_signal(signal.SIGTERM)
            second.wait(timeout=60)
    job = get_job(job_id)
    assert job.status == "succeeded", job.error
    assert job.attempt == 2 and job.infra_failures == 1
    resumed = [
        e.data["resumed_from_step"] for e in events(job_id) if e.data and "resumed_from_step" in e.data
    ]
    assert resumed and resumed[0] >= killed_at
    assert metric_steps(job_id)[-1] == 16
    assert job.trained_tokens > 0


def test_sigterm_finishes_the_step_checkpoints_releases_and_exits_0(settings, base_model_dir, tmp_path):
    job_id = training_job(settings, base_model_dir)
    worker = start_worker_process(
        tmp_path / "worker.log", **quick_lease(TUNEFORGE_CHECKPOINT_EVERY_STEPS=1000)
    )
    try:
        wait_for(lambda: metric_steps(job_id), timeout=120, message="training to start")
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
    finally:
        worker.kill()
    job = get_job(job_id)
    assert job.status == "queued" and job.worker_id is None and job.lease_expires_at is None
    steps = checkpoint_steps(job_id)
    assert steps and steps[-1] >= max(metric_steps(job_id))
    assert "released" in events(job_id)[-1].message


@pytest.mark.parametrize("crash_at", ["publish_before_rename", "publish_before_commit"])
def test_crash_during_publish_leaves_no_model_and_no_half_written_adapter(store_settings, tmp_path, crash_at):
    """On the data dir and on S3 alike."""
    settings, artifacts = store_settings, open_store(store_settings)
    tenant = create_tenant()
    job_id = create_job(tenant, create_file(settings, tenant, ARITHMETIC[:1], "prompt_completion"))
    env = quick_lease(TUNEFORGE_TEST_RECIPE="noop")
    crashing = start_worker_process(tmp_path / "crash.log", TUNEFORGE_TEST_CRASH_AT=crash_at, **env)
    assert crashing.wait(timeout=60) == 70
    with session_scope() as session:
        assert session.scalars(select(Model)).all() == []
    assert get_job(job_id).status == "running"
    adapters = {}
    for obj in artifacts.list_objects("adapters/"):
        _, version, name = obj.key.split("/")
        adapters.setdefault(version, set()).add(name)
    for names in adapters.values():  # only a complete, unreferenced adapter may remain
        assert names == {"adapter_config.json", "adapter_model.safetensors", "manifest.json"}

    recovering = start_worker_process(tmp_path / "recover.log", **env)
    try:
        wait_for(lambda: get_job(job_id).status == "succeeded", timeout=60, message="the job to succeed")
    finally:
        recovering.send_signal(signal.SIGTERM)
        assert recovering.wait(timeout=30) == 0
    with session_scope() as session:
        model = session.get(Model, get_job(job_id).output_model)
    assert artifacts.exists(f"{model.path}/manifest.json")
    assert not list(settings.data_dir.joinpath("jobs", job_id).glob(".tmp-*"))
