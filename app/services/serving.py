"""The base models this API process serves: one inference engine per base named in
TUNEFORGE_SERVE_BASE_MODELS (or TUNEFORGE_SERVE_BASE_MODEL), and the bases it refused at start,
each with why. A request goes to the engine of its model's base."""

from app.core.base_models import BaseModelUnavailable, UnknownBaseModel, resolve_base_model
from app.core.errors import InvalidRequest, ServiceUnavailable
from app.core.metrics import merge_families
from app.core.model_families import UnsupportedBaseModel, describe_base_model
from app.core.settings import Settings

SERVE_SETTING = "TUNEFORGE_SERVE_BASE_MODELS"


def check_served_base(name: str, settings: Settings) -> None:
    """Refuse, before any weights load, a served base that is not configured or whose family is not
    supported (UnsupportedBaseModel, naming the base, its family and what is supported)."""
    try:
        directory = resolve_base_model(name, settings)
    except BaseModelUnavailable as exc:
        raise UnsupportedBaseModel(str(exc)) from exc
    except UnknownBaseModel as exc:
        if name in settings.base_models:  # configured, but its hub id is not to be had
            raise UnsupportedBaseModel(str(exc)) from exc
        raise UnsupportedBaseModel(
            f"Base model '{name}' is listed to be served but not configured: add it to "
            "TUNEFORGE_BASE_MODELS (name -> local Hugging Face checkpoint directory or hub id)."
        ) from exc
    describe_base_model(name, directory).check_supported()


class ServedBases:
    def __init__(self, names: list[str]):
        self.names = names
        self.engines: dict = {}  # name -> app.inference.engine_process.EngineProcess
        self.refused: dict[str, str] = {}

    def serve(self, name: str, engine) -> None:
        self.engines[name] = engine

    def refuse(self, name: str, reason: str) -> None:
        self.refused[name] = reason

    def servable(self) -> list[str]:
        return [name for name in self.names if name in self.engines and self.engines[name].ready]

    def engine_for(self, base: str, model_id: str):
        engine = self.engines.get(base)
        if engine is not None and engine.ready:
            return engine
        if base in self.refused:
            raise InvalidRequest(
                f"The model '{model_id}' is built on {base}, which this server cannot serve: "
                f"{self.refused[base]}",
                param="model",
                code="model_not_served",
            )
        if base not in self.names:
            raise InvalidRequest(
                f"The model '{model_id}' is built on {base}, which this server does not serve (it "
                f"serves {', '.join(self.names)}); add {base} to {SERVE_SETTING} to serve it.",
                param="model",
                code="model_not_served",
            )
        state = "starting" if engine is None else engine.state
        raise ServiceUnavailable(f"The inference engine for {base} is {state}; retry shortly.")

    def unload(self, version: str) -> None:
        """Drop an adapter version from every engine (its model id was deleted)."""
        for engine in self.engines.values():
            engine.unload(version)

    def checks(self) -> dict[str, str]:
        """Readiness of each served base's engine ("ok", "loading", "restarting" or "stopped")."""
        return {f"engine:{name}": self.engines[name].state for name in self.names if name in self.engines}

    def metric_families(self) -> list:
        """The engines' metrics (each engine process keeps its own), as one set."""
        return merge_families([engine.metrics() for engine in self.engines.values()])

    def stop(self) -> None:
        for engine in self.engines.values():
            engine.stop()
