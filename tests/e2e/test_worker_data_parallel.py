"""A real `python -m worker` training one job on two gloo ranks: killed with SIGKILL, its ranks die
with it, and another worker resumes the job from its last checkpoint."""

import signal
from pathlib import Path

import pytest
from sqlalchemy import select

from app.core.db import session_scope
from app.models import Checkpoint
from tests.chat_template_support import family_tokenizer
from tests.model_families_support import build_base
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
    update_job,
    wait_for,
)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def checkpoint_steps(job_id):
    with session_scope() as session:
        return sorted(session.scalars(select(Checkpoint.step).where(Checkpoint.job_id == job_id)))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_killed_data_parallel_worker_takes_its_ranks_along_and_the_job_resumes(
    settings, base_model_dir, tmp_path
):
    tiny = tmp_path / "tiny-llama"
    build_base("llama", tiny, family_tokenizer(base_model_dir, "llama"))
    tenant = create_tenant()
    job_id = create_job(
        tenant, create_file(settings, tenant, ARITHMETIC, "prompt_completion"), n_epochs=6, batch_size=2
    )
    update_job(job_id, model="tiny")
    env = quick_lease(
        TUNEFORGE_BASE_MODELS=f'{{"tiny": "{tiny}"}}',
        TUNEFORGE_WORKER_GPUS="0,1",
        TUNEFORGE_CHECKPOINT_EVERY_STEPS=4,
    )
    first = start_worker_process(tmp_path / "first.log", **env)
    try:
        wait_for(lambda: checkpoint_steps(job_id), timeout=180, message="a checkpoint")
        ranks = children(first.pid)
        assert len(ranks) >= 2, ranks  # the two ranks (and multiprocessing's resource tracker)
        first.send_signal(signal.SIGKILL)
        first.wait()
        killed_at = max(checkpoint_steps(job_id))
        wait_for(lambda: not any(alive(pid) for pid in ranks), timeout=10, message="the ranks to die")
        second = start_worker_process(tmp_path / "second.log", **env)
        wait_for(lambda: get_job(job_id).status in ("succeeded", "failed"), timeout=240, message="the end")
    finally:
        first.kill()
        if "second" in locals():
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=60) == 0
    job = get_job(job_id)
    assert job.status == "succeeded", job.error
    assert job.attempt == 2 and job.infra_failures == 1
    resumed = [e.data["resumed_from_step"] for e in events(job_id) if "resumed_from_step" in (e.data or {})]
    assert resumed and resumed[0] >= killed_at
    assert metric_steps(job_id)[-1] == 48
