from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.api.deps import SessionDep
from app.api.openapi import text_response
from app.core.metrics import JOBS_BY_STATUS, QUEUE_DEPTH, REGISTRY
from app.models import JobStatus
from app.schemas import Health, Readiness
from app.services.jobs import count_by_status

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz():
    """The process is up."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready: `checks` says what is not."}},
)
def readyz(request: Request, session: SessionDep):
    """The database answers and the inference engine has its base model loaded."""
    checks = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - report any database failure as not ready
        checks["database"] = f"error: {type(exc).__name__}"
    engine = getattr(request.app.state, "engine", None)
    checks["engine"] = "ok" if engine is None or engine.ready else "loading"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503
    )


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses=text_response("text/plain", "Prometheus text exposition format."),
)
def metrics(session: SessionDep):
    """Prometheus metrics."""
    counts = count_by_status(session)
    for status in JobStatus:
        JOBS_BY_STATUS.labels(status.value).set(counts.get(status.value, 0))
    QUEUE_DEPTH.set(counts.get(JobStatus.queued.value, 0))
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
