from typing import Annotated

from fastapi import APIRouter, Header, Query, Response

from app.api.deps import SessionDep, TenantDep
from app.api.openapi import error_responses
from app.core.settings import get_settings
from app.schemas import CheckpointPublic, JobCreate, JobEventPublic, JobPublic, ListPage
from app.services import jobs as service

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning"], responses=error_responses(401))
Limit = Annotated[int, Query(ge=1, le=100)]


REPLAYED = {
    "Idempotent-Replayed": {
        "description": "`true` when an earlier request with this Idempotency-Key made the job.",
        "schema": {"type": "string", "enum": ["true"]},
    }
}


@router.post("", response_model=JobPublic, responses={200: {"headers": REPLAYED}} | error_responses(400, 409))
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
    return JobPublic.model_validate(job)


@router.get("", response_model=ListPage[JobPublic], responses=error_responses(400, 404))
def list_jobs(session: SessionDep, tenant: TenantDep, after: str | None = None, limit: Limit = 20):
    rows, more = service.list_jobs(session, tenant, after, limit)
    return ListPage[JobPublic].of([JobPublic.model_validate(j) for j in rows], more)


@router.get("/{job_id}", response_model=JobPublic, responses=error_responses(404))
def retrieve_job(job_id: str, session: SessionDep, tenant: TenantDep):
    return JobPublic.model_validate(service.get_job(session, tenant, job_id))


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=error_responses(400, 404))
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep):
    return JobPublic.model_validate(service.apply_action(session, tenant, job_id, "cancel"))


@router.post("/{job_id}/pause", response_model=JobPublic, responses=error_responses(400, 404))
def pause_job(job_id: str, session: SessionDep, tenant: TenantDep):
    return JobPublic.model_validate(service.apply_action(session, tenant, job_id, "pause"))


@router.post("/{job_id}/resume", response_model=JobPublic, responses=error_responses(400, 404))
def resume_job(job_id: str, session: SessionDep, tenant: TenantDep):
    return JobPublic.model_validate(service.apply_action(session, tenant, job_id, "resume"))


@router.get("/{job_id}/events", response_model=ListPage[JobEventPublic], responses=error_responses(400, 404))
def list_events(
    job_id: str, session: SessionDep, tenant: TenantDep, after: str | None = None, limit: Limit = 20
):
    rows, more = service.list_events(session, tenant, job_id, after, limit)
    return ListPage[JobEventPublic].of([JobEventPublic.model_validate(e) for e in rows], more)


@router.get(
    "/{job_id}/checkpoints", response_model=ListPage[CheckpointPublic], responses=error_responses(400, 404)
)
def list_checkpoints(
    job_id: str, session: SessionDep, tenant: TenantDep, after: str | None = None, limit: Limit = 10
):
    rows, more = service.list_checkpoints(session, tenant, job_id, after, limit)
    return ListPage[CheckpointPublic].of([CheckpointPublic.model_validate(c) for c in rows], more)
