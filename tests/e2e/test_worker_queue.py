"""Four worker processes drain 200 jobs from one PostgreSQL: every job runs exactly once."""

import signal
from collections import Counter

import pytest
from sqlalchemy import select

from app.core.db import session_scope
from app.models import Job, JobEvent, Model, new_id
from tests.worker_support import (
    ARITHMETIC,
    HYPERPARAMETERS,
    create_file,
    create_tenant,
    quick_lease,
    start_worker_process,
    wait_for,
)


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_four_workers_run_200_jobs_exactly_once(settings, tmp_path):
    tenant = create_tenant()
    training_file = create_file(settings, tenant, ARITHMETIC[:1], "prompt_completion")
    with session_scope() as session:
        ids = [new_id("ftjob") for _ in range(200)]
        session.add_all(
            Job(
                id=i,
                tenant_id=tenant,
                model="SmolLM2-135M-Instruct",
                training_file=training_file,
                seed=0,
                hyperparameters=HYPERPARAMETERS,
                output_model=f"ft:x:acme::{i}",
            )
            for i in ids
        )
    env = quick_lease(TUNEFORGE_TEST_RECIPE="noop", TUNEFORGE_POLL_SECONDS=0.05)
    workers = [start_worker_process(tmp_path / f"w{n}.log", **env) for n in range(4)]
    try:

        def done():
            with session_scope() as session:
                return session.scalars(select(Job.status).where(Job.status != "succeeded")).first() is None

        wait_for(done, timeout=240, message="all jobs to succeed", interval=0.5)
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        codes = [w.wait(timeout=60) for w in workers]
    assert codes == [0, 0, 0, 0]
    with session_scope() as session:
        jobs = session.scalars(select(Job)).all()
        starts = Counter(
            e.job_id
            for e in session.scalars(select(JobEvent).where(JobEvent.message.like("Attempt %started%")))
        )
        models = session.scalars(select(Model.job_id).where(Model.kind == "fine_tune")).all()
    assert all(j.status == "succeeded" and j.attempt == 1 for j in jobs)
    assert set(starts) == set(ids) and set(starts.values()) == {1}
    assert sorted(models) == sorted(ids)
    assert all(j.lease_expires_at is None for j in jobs)
    assert len({j.worker_id for j in jobs}) == 4  # the queue was shared
