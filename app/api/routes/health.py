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
    """The database answers and every served base model's engine is loaded. Bases refused at start
    (not configured, family not supported) are listed under `refused` with why; they do not make
    the server unready unless it serves none."""
    checks = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - report any database failure as not ready
        checks["database"] = f"error: {type(exc).__name__}"
    served = getattr(request.app.state, "served", None)
    refused = served.refused if served is not None else {}
    checks.update(served.checks() if served is not None else {"engine": "loading"})
    if served is not None and not served.engines:
        checks["engine"] = "no base model can be served: see refused"
    ready = all(v == "ok" for v in checks.values())
    body = {"status": "ready" if ready else "not ready", "checks": checks, "refused": refused}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses=text_response("text/plain", "Prometheus text exposition format."),
)
def metrics(request: Request, session: SessionDep):
    """Prometheus metrics."""
    counts = count_by_status(session)
    for status in JobStatus:
        JOBS_BY_STATUS.labels(status.value).set(counts.get(status.value, 0))
    QUEUE_DEPTH.set(counts.get(JobStatus.queued.value, 0))
    served = getattr(request.app.state, "served", None)
    engines = _Families(served.metric_families() if served is not None else [])
    return Response(generate_latest(REGISTRY) + generate_latest(engines), media_type=CONTENT_TYPE_LATEST)


class _Families:
    """Metric families already collected, in the shape generate_latest reads."""

    def __init__(self, families: list):
        self.families = families

    def collect(self):
        return self.families
