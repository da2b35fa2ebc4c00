"""The API process: control-plane routes and the inference engine."""

import asyncio
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from app.api.routes import files, health, inference, jobs, models
from app.core.errors import install_error_handlers
from app.core.metrics import HTTP_LATENCY, HTTP_REQUESTS
from app.core.settings import get_settings


@asynccontextmanager
async def lifespan(app: FastAPI):
    # Imported here: torch and the model load only when the server actually starts.
    from app.inference.engine import Engine

    def start_engine() -> Engine:
        engine = Engine(get_settings())
        engine.start()
        return engine

    app.state.engine = await asyncio.to_thread(start_engine)
    try:
        yield
    finally:
        await asyncio.to_thread(app.state.engine.stop)


def create_app() -> FastAPI:
    app = FastAPI(
        title="Tuneforge",
        version="0.1.0",
        description="QLoRA fine-tuning jobs and multi-adapter LoRA serving, OpenAI-compatible under /v1.",
        lifespan=lifespan,
    )
    install_error_handlers(app)

    @app.middleware("http")
    async def _count_requests(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        HTTP_REQUESTS.labels(request.method, path, str(response.status_code)).inc()
        HTTP_LATENCY.labels(request.method, path).observe(time.perf_counter() - start)
        return response

    app.include_router(health.router)
    app.include_router(files.router, prefix="/v1")
    app.include_router(jobs.router, prefix="/v1")
    app.include_router(models.router, prefix="/v1")
    app.include_router(inference.router)
    return app
