"""The job status machine and idempotent creation against real SQLite and PostgreSQL."""

import io
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.core.db import get_sessionmaker
from app.core.errors import Conflict, InvalidRequest
from app.core.storage import open_store
from app.models import Job, JobStatus
from app.schemas import JobCreate
from app.services import files, jobs, keys

EXAMPLE = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


@pytest.fixture
def tenant_and_file(settings):
    with get_sessionmaker()() as s:
        keys.create_key(s, "acme")
        tenant = keys.get_or_create_tenant(s, "acme")
        s.commit()
        f = files.store_file(
            s,
            settings,
            open_store(settings),
            tenant,
            upload=io.BytesIO(json.dumps(EXAMPLE).encode()),
            filename="t.jsonl",
            purpose="fine-tune",
        )
        return tenant, f


def new_job(settings, tenant, f, key=None, **kw):
    with get_sessionmaker()() as s:
        body = JobCreate(model="SmolLM2-135M-Instruct", training_file=f.id, **kw)
        return jobs.create_job(s, settings, tenant, body, key)


def set_status(job_id, status):
    with get_sessionmaker()() as s:
        s.get(Job, job_id).status = status
        s.commit()


@pytest.mark.parametrize(
    "start, action, result",
    [
        (JobStatus.queued, "cancel", JobStatus.cancelled),
        (JobStatus.running, "cancel", JobStatus.cancelled),
        (JobStatus.paused, "cancel", JobStatus.cancelled),
        (JobStatus.queued, "pause", JobStatus.paused),
        (JobStatus.running, "pause", JobStatus.running),
        (JobStatus.paused, "resume", JobStatus.queued),
    ],
)
def test_allowed_transitions(settings, tenant_and_file, start, action, result):
    tenant, f = tenant_and_file
    job, _ = new_job(settings, tenant, f)
    set_status(job.id, start)
    with get_sessionmaker()() as s:
        after = jobs.apply_action(s, tenant, job.id, action)
    assert after.status == result
    # Pausing a running job only asks the worker to pause at its next checkpoint.
    assert after.pause_requested == (start == JobStatus.running and action == "pause")


@pytest.mark.parametrize("start", [JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled])
@pytest.mark.parametrize("action", ["cancel", "pause", "resume"])
def test_finished_jobs_refuse_every_action(settings, tenant_and_file, start, action):
    tenant, f = tenant_and_file
    job, _ = new_job(settings, tenant, f)
    set_status(job.id, start)
    with get_sessionmaker()() as s, pytest.raises(InvalidRequest) as err:
        jobs.apply_action(s, tenant, job.id, action)
    assert err.value.code == "invalid_job_state"
    with get_sessionmaker()() as s:
        assert s.get(Job, job.id).status == start


def test_concurrent_creates_with_one_idempotency_key_make_one_job(settings, tenant_and_file):
    tenant, f = tenant_and_file
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: new_job(settings, tenant, f, "same-key")[0].id, range(8)))
    assert len(set(results)) == 1
    with get_sessionmaker()() as s:
        assert s.query(Job).count() == 1
    with pytest.raises(Conflict):
        new_job(settings, tenant, f, "same-key", suffix="different")


def test_an_empty_idempotency_key_is_no_key(settings, tenant_and_file):
    # Found by the OpenAPI fuzz: a second empty key hit the unique index and answered 500.
    tenant, f = tenant_and_file
    first, second = new_job(settings, tenant, f, ""), new_job(settings, tenant, f, "")
    assert first[1] and second[1] and first[0].id != second[0].id


def test_migrations_are_idempotent(settings):
    from app.core.migrate import upgrade

    upgrade(settings.resolved_database_url)
    upgrade(settings.resolved_database_url)
