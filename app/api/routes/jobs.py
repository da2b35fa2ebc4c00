from typing import Annotated

from fastapi import APIRouter, Header, Query, Response

from app.api.deps import SessionDep, TenantDep
from app.core.settings import get_settings
from app.models import Checkpoint, Job, JobEvent
from app.schemas import CheckpointPublic, JobCreate, JobError, JobEventPublic, JobPublic, ListPage
from app.services import jobs as service

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning"])
Limit = Annotated[int, Query(ge=1, le=100)]


def job_public(job: Job, organization_id: str) -> JobPublic:
    return JobPublic(
        id=job.id,
        created_at=job.created_at,
        error=JobError(**job.error) if job.error else None,
        fine_tuned_model=job.fine_tuned_model,
        finished_at=job.finished_at,
        hyperparameters=job.hyperparameters,
        method={"type": "supervised", "supervised": {"hyperparameters": job.hyperparameters}},
        model=job.model,
        organization_id=organization_id,
        seed=job.seed,
        # A running job asked to pause still reports running until the worker has checkpointed.
        status=job.status,
        trained_tokens=job.trained_tokens,
        training_file=job.training_file,
        validation_file=job.validation_file,
        metadata=job.metadata_,
        user_provided_suffix=job.suffix,
    )


def event_public(event: JobEvent) -> JobEventPublic:
    return JobEventPublic(
        id=f"ftevent-{event.id}",
        created_at=event.created_at,
        level=event.level,
        message=event.message,
        data=event.data,
        # Lifecycle events carry data too (attempt, checkpoint id); only step metrics are "metrics".
        type="metrics" if event.data and "train_loss" in event.data else "message",
    )


def checkpoint_public(ckpt: Checkpoint, job: Job) -> CheckpointPublic:
    metrics = {k: float(v) for k, v in (ckpt.metrics or {}).items() if isinstance(v, int | float)}
    return CheckpointPublic(
        id=ckpt.id,
        created_at=ckpt.created_at,
        fine_tuned_model_checkpoint=f"{job.output_model}:ckpt-step-{ckpt.step}",
        fine_tuning_job_id=job.id,
        metrics={"step": float(ckpt.step), **metrics},
        step_number=ckpt.step,
    )


@router.post("", response_model=JobPublic)
def create_job(
    body: JobCreate,
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
):
    """Create a supervised LoRA fine-tuning job; it waits in `queued` for a worker."""
    job, created = service.create_job(session, get_settings(), tenant, body, idempotency_key)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return job_public(job, tenant.id)


@router.get("", response_model=ListPage[JobPublic])
def list_jobs(session: SessionDep, tenant: TenantDep, after: str | None = None, limit: Limit = 20):
    rows, more = service.list_jobs(session, tenant, after, limit)
    return ListPage[JobPublic].of([job_public(j, tenant.id) for j in rows], more)


@router.get("/{job_id}", response_model=JobPublic)
def retrieve_job(job_id: str, session: SessionDep, tenant: TenantDep):
    return job_public(service.get_job(session, tenant, job_id), tenant.id)


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep):
    return job_public(service.apply_action(session, tenant, job_id, "cancel"), tenant.id)


@router.post("/{job_id}/pause", response_model=JobPublic)
def pause_job(job_id: str, session: SessionDep, tenant: TenantDep):
    return job_public(service.apply_action(session, tenant, job_id, "pause"), tenant.id)


@router.post("/{job_id}/resume", response_model=JobPublic)
def resume_job(job_id: str, session: SessionDep, tenant: TenantDep):
    return job_public(service.apply_action(session, tenant, job_id, "resume"), tenant.id)


@router.get("/{job_id}/events", response_model=ListPage[JobEventPublic])
def list_events(
    job_id: str, session: SessionDep, tenant: TenantDep, after: str | None = None, limit: Limit = 20
):
    rows, more = service.list_events(session, tenant, job_id, after, limit)
    return ListPage[JobEventPublic].of([event_public(e) for e in rows], more)


@router.get("/{job_id}/checkpoints", response_model=ListPage[CheckpointPublic])
def list_checkpoints(
    job_id: str, session: SessionDep, tenant: TenantDep, after: str | None = None, limit: Limit = 10
):
    job = service.get_job(session, tenant, job_id)
    rows, more = service.list_checkpoints(session, tenant, job_id, after, limit)
    return ListPage[CheckpointPublic].of([checkpoint_public(c, job) for c in rows], more)
