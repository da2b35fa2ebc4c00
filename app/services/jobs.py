"""Fine-tuning jobs: creation with full validation, and the one status machine the API applies."""

import hashlib
import json
import secrets

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.base_models import (
    BaseModelUnavailable,
    UnknownBaseModel,
    available_base_models,
    resolve_base_model,
)
from app.core.errors import Conflict, InvalidRequest, NotFound
from app.core.model_families import UnsupportedBaseModel, describe_base_model
from app.core.settings import Settings
from app.models import Checkpoint, File, Job, JobEvent, JobStatus, Tenant, new_id, now
from app.schemas import JobCreate
from app.services.files import PURPOSE, get_file
from app.services.pagination import page

# action -> statuses it may start from. Pause and cancel of a running job are carried out by
# the worker at its next step (it watches `pause_requested` and the status it is fenced on).
ALLOWED_FROM = {
    "cancel": {JobStatus.validating_files, JobStatus.queued, JobStatus.running, JobStatus.paused},
    "pause": {JobStatus.queued, JobStatus.running},
    "resume": {JobStatus.paused},
}


def output_model_name(base: str, tenant: Tenant, suffix: str | None, job_id: str) -> str:
    return f"ft:{base}:{tenant.name}:{suffix or ''}:{job_id}"


def _request_hash(body: JobCreate) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _training_file(session: Session, tenant: Tenant, file_id: str, param: str) -> File:
    try:
        row = get_file(session, tenant, file_id, param=param)
    except NotFound:
        raise InvalidRequest(
            f"{param} '{file_id}' does not exist; upload it with POST /v1/files first.",
            param=param,
            code="invalid_file",
        ) from None
    if row.purpose != PURPOSE:
        raise InvalidRequest(f"{param} '{file_id}' was not uploaded with purpose 'fine-tune'.", param=param)
    return row


def create_job(
    session: Session,
    settings: Settings,
    tenant: Tenant,
    body: JobCreate,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Returns (job, created). A repeated Idempotency-Key returns the first job unchanged; an empty
    one is no key."""
    idempotency_key = idempotency_key or None
    request_hash = _request_hash(body)
    if idempotency_key:
        existing = _by_idempotency_key(session, tenant, idempotency_key)
        if existing is not None:
            return _replay(existing, request_hash), False
    if body.model not in available_base_models(settings):
        raise InvalidRequest(
            f"Model '{body.model}' is not a base model here; choose one of "
            f"{', '.join(available_base_models(settings))}.",
            param="model",
            code="model_not_available",
        )
    _check_family(body.model, settings)
    training = _training_file(session, tenant, body.training_file, "training_file")
    if body.validation_file:
        _training_file(session, tenant, body.validation_file, "validation_file")
    job_id = new_id("ftjob")
    job = Job(
        id=job_id,
        tenant_id=tenant.id,
        model=body.model,
        training_file=body.training_file,
        validation_file=body.validation_file,
        suffix=body.suffix,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
        metadata_=body.metadata,
        # As requested: the worker resolves "auto" once it has tokenized the file, and records it.
        hyperparameters=body.requested_hyperparameters.model_dump(),
        status=JobStatus.queued,
        output_model=output_model_name(body.model, tenant, body.suffix, job_id),
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    session.add(job)
    session.add(JobEvent(job_id=job.id, message=f"Validated training file: {training.id}"))
    session.add(JobEvent(job_id=job.id, message="Job queued"))
    try:
        session.commit()
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key won the race: answer with its job.
        session.rollback()
        existing = _by_idempotency_key(session, tenant, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return _replay(existing, request_hash), False
    return job, True


def _check_family(name: str, settings: Settings) -> None:
    """Refuse a job on a configured base whose family Tuneforge does not train, before the job
    exists. Only a base whose files are on this host is read: a hub id is not downloaded in a
    request (the worker checks the base before it loads anything), and the embedded base, a
    Llama, is not materialised."""
    if name not in settings.base_models:
        return
    try:
        directory = resolve_base_model(name, settings, download=False)
    except (UnknownBaseModel, BaseModelUnavailable):
        return
    if not (directory / "config.json").is_file():
        return
    try:
        describe_base_model(name, directory).check_supported()
    except UnsupportedBaseModel as exc:
        raise InvalidRequest(str(exc), param="model", code="model_not_supported") from None


def _by_idempotency_key(session: Session, tenant: Tenant, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.tenant_id == tenant.id, Job.idempotency_key == key))


def _replay(job: Job, request_hash: str) -> Job:
    if job.request_hash != request_hash:
        raise Conflict(
            "This Idempotency-Key was already used with different parameters; use a new key.",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    return job


def get_job(session: Session, tenant: Tenant, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant.id:
        raise NotFound(f"No such fine-tuning job: '{job_id}'.", param="fine_tuning_job_id")
    return job


def list_jobs(session: Session, tenant: Tenant, after: str | None, limit: int) -> tuple[list[Job], bool]:
    query = select(Job).where(Job.tenant_id == tenant.id)
    pivot = None
    if after:
        cursor = get_job(session, tenant, after)
        pivot = (cursor.created_at, cursor.id)
    return page(session, query, (Job.created_at, Job.id), pivot, limit)


def apply_action(session: Session, tenant: Tenant, job_id: str, action: str) -> Job:
    """cancel | pause | resume, under a row lock so a worker's concurrent write cannot interleave."""
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant.id).with_for_update())
    if job is None:
        raise NotFound(f"No such fine-tuning job: '{job_id}'.", param="fine_tuning_job_id")
    if job.status not in ALLOWED_FROM[action]:
        raise InvalidRequest(
            f"Cannot {action} a job that is {job.status}; {action} applies to jobs that are "
            f"{' or '.join(sorted(ALLOWED_FROM[action]))}.",
            param="fine_tuning_job_id",
            code="invalid_job_state",
        )
    if action == "cancel":
        job.status, job.finished_at, job.pause_requested = JobStatus.cancelled, now(), False
        job.worker_id = job.lease_expires_at = None
        message = "Job cancelled"
    elif action == "pause" and job.status == JobStatus.running:
        job.pause_requested = True
        message = "Pause requested; the job pauses after its next checkpoint"
    elif action == "pause":
        job.status = JobStatus.paused
        message = "Job paused"
    else:
        job.status, job.run_after = JobStatus.queued, 0.0
        message = "Job resumed and queued; it continues from its last checkpoint"
    session.add(JobEvent(job_id=job.id, message=message))
    session.commit()
    return job


def list_events(
    session: Session, tenant: Tenant, job_id: str, after: str | None, limit: int
) -> tuple[list[JobEvent], bool]:
    get_job(session, tenant, job_id)
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    pivot = None
    if after:
        # An unknown cursor is 404, as for files and jobs; ids are 64-bit integers.
        number = after.removeprefix("ftevent-")
        is_id = number.isascii() and number.isdigit() and len(number) < 19
        cursor = session.get(JobEvent, int(number)) if is_id else None
        if cursor is None or cursor.job_id != job_id:
            raise NotFound(f"No event '{after}' in this job.", param="after")
        pivot = (cursor.id,)
    return page(session, query, (JobEvent.id,), pivot, limit)


def list_checkpoints(
    session: Session, tenant: Tenant, job_id: str, after: str | None, limit: int
) -> tuple[list[Checkpoint], bool]:
    get_job(session, tenant, job_id)
    query = select(Checkpoint).where(Checkpoint.job_id == job_id)
    pivot = None
    if after:
        cursor = session.get(Checkpoint, after)
        if cursor is None or cursor.job_id != job_id:
            raise NotFound(f"No checkpoint '{after}' in this job.", param="after")
        pivot = (cursor.step, cursor.id)
    return page(session, query, (Checkpoint.step, Checkpoint.id), pivot, limit)


def count_by_status(session: Session) -> dict[str, int]:
    return dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
