"""The API process: control-plane routes and the inference engine."""

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api.openapi import install_openapi
from app.api.routes import files, health, inference, jobs, models
from app.core.errors import install_error_handlers
from app.core.metrics import HTTP_LATENCY, HTTP_REQUESTS
from app.core.model_families import UnsupportedBaseModel
from app.core.settings import get_settings
from app.services.serving import ServedBases, check_served_base

log = logging.getLogger("uvicorn.error")


@asynccontextmanager
async def lifespan(app: FastAPI):
    # Imported here: the tokenizers load only when the server actually starts (and the models, in
    # the engine processes).
    from app.inference.engine_process import EngineProcess, EngineStartFailed

    settings = get_settings()
    served = app.state.served = ServedBases(settings.served_base_models)

    def start_engine(name: str) -> EngineProcess:
        check_served_base(name, settings)
        engine = EngineProcess(settings, base_model=name)
        engine.start()
        log.info("serving base model %s: %s", name, engine.capacity())
        return engine

    try:
        # A base that cannot be served is refused, saying why; the others are served all the same.
        for name in served.names:
            try:
                served.serve(name, await asyncio.to_thread(start_engine, name))
            except UnsupportedBaseModel as exc:
                served.refuse(name, str(exc))
                log.error("not serving base model %s: %s", name, exc)
            except EngineStartFailed as exc:
                served.refuse(name, f"its engine failed to start ({exc})")
                log.error("not serving base model %s: its engine failed to start (%s)", name, exc)
            except Exception as exc:  # noqa: BLE001 - e.g. its tokenizer does not load
                served.refuse(name, f"its engine failed to start ({type(exc).__name__}: {exc})")
                log.exception("not serving base model %s: its engine failed to start", name)
        yield
    finally:
        await asyncio.to_thread(served.stop)


class RequestMetrics:
    """Counts requests and times them to the end of the response body. A plain ASGI middleware:
    `@app.middleware("http")` would pass every SSE chunk through an extra task and memory stream."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_with_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            HTTP_REQUESTS.labels(scope["method"], path, str(status)).inc()
            HTTP_LATENCY.labels(scope["method"], path).observe(time.perf_counter() - start)


def create_app() -> FastAPI:
    app = FastAPI(
        title="Tuneforge",
        version="0.1.0",
        description="QLoRA fine-tuning jobs and multi-adapter LoRA serving, OpenAI-compatible under /v1.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    install_openapi(app)

    app.add_middleware(RequestMetrics)
    app.include_router(health.router)
    app.include_router(files.router, prefix="/v1")
    app.include_router(jobs.router, prefix="/v1")
    app.include_router(models.router, prefix="/v1")
    app.include_router(inference.router)
    return app
