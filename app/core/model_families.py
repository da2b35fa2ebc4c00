"""The base-model families Tuneforge trains and serves, keyed by the `model_type` in a checkpoint's
config.json, and what a configured base is (family, size, dtype), read from its files without
loading it: the API, the CLI and job creation decide on a base before any torch is imported."""

import json
from dataclasses import dataclass
from functools import cached_property
from math import prod
from pathlib import Path

from app.core.adapter_files import base_weight_files, read_safetensors_header

FAMILIES: dict[str, str] = {
    "llama": "Llama (Llama 2, Llama 3.x incl. llama3 rope scaling, TinyLlama, SmolLM2)",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text)",
    "phi3": "Phi-3",
}


def supported_families() -> str:
    return ", ".join(FAMILIES)


class UnsupportedBaseModel(ValueError):
    """A configured base that Tuneforge cannot train or serve; the message names the base, its
    family and what is supported."""


@dataclass(frozen=True)
class BaseModelInfo:
    name: str
    path: Path
    model_type: str
    dtype: str | None

    @cached_property
    def parameters(self) -> int | None:
        """Counted from the weight files' safetensors headers (read only when asked: a support check
        needs none of it); None without safetensors weights."""
        files = [path for path in base_weight_files(self.path) if path.is_file()]
        if not files:
            return None
        return sum(prod(info["shape"]) for path in files for info in read_safetensors_header(path).values())

    @property
    def family(self) -> str:
        return FAMILIES.get(self.model_type, f"{self.model_type} (not supported)")

    @property
    def supported(self) -> bool:
        return self.model_type in FAMILIES

    def check_supported(self) -> None:
        if not self.supported:
            raise UnsupportedBaseModel(
                f"Base model '{self.name}' is a '{self.model_type}' model, which Tuneforge does not "
                f"support; supported families (config.json model_type): {supported_families()}."
            )


def describe_base_model(name: str, directory: Path) -> BaseModelInfo:
    """Family, size and dtype of the checkpoint in `directory`; a missing or unreadable config is
    an UnsupportedBaseModel naming the directory."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UnsupportedBaseModel(
            f"Base model '{name}': {directory / 'config.json'} cannot be read ({exc}); point "
            "TUNEFORGE_BASE_MODELS at a local Hugging Face checkpoint directory."
        ) from exc
    return BaseModelInfo(
        name=name,
        path=directory,
        model_type=config.get("model_type", "unknown"),
        dtype=config.get("dtype") or config.get("torch_dtype"),
    )
