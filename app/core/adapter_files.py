"""PEFT LoRA adapter directories: the checks a server and an import make, with no torch (config,
safetensors headers against the base model's tensor shapes, manifest hash)."""

import functools
import hashlib
import json
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from app.core.artifacts import WEIGHTS_FILE

ADAPTER_FILES = ("adapter_config.json", WEIGHTS_FILE)
PEFT_PREFIX = "base_model.model."
MAX_HEADER_BYTES = 100 * 1024 * 1024
SERVED_DTYPES = ("F32", "BF16", "F16")  # safetensors names of the weight dtypes a server loads
# Verifies the blocks of a weights file in parallel: hashlib releases the GIL while it hashes.
_BLOCK_HASHERS = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="adapter-hash")


class AdapterFileError(ValueError):
    """The adapter directory cannot be served; the message says why."""


class AdapterGone(AdapterFileError):
    """The adapter was deleted (its model id, or its files) while a request wanted it."""


@dataclass(frozen=True)
class LoraModuleSpec:
    rank: int
    scale: float


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Tensor name -> {"dtype", "shape", "data_offsets"}; refuses a truncated or malformed file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise AdapterFileError(f"{path.name} is truncated (no safetensors header)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise AdapterFileError(f"{path.name} is truncated or not a safetensors file")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as exc:
            raise AdapterFileError(f"{path.name} has a malformed safetensors header") from exc
    header.pop("__metadata__", None)
    data_len = size - 8 - header_len
    for name, info in header.items():
        end = info.get("data_offsets", [0, 0])[1]
        if end > data_len:
            raise AdapterFileError(f"{path.name} is truncated (tensor {name} lies past the end)")
    return header


def base_weight_files(base_dir: Path) -> list[Path]:
    """The files that hold a base checkpoint's weights: the shards its index names, else
    model.safetensors (other .safetensors files beside them, another layout of the same weights,
    are not the model's)."""
    index = base_dir / "model.safetensors.index.json"
    if index.exists():
        return sorted({base_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [base_dir / "model.safetensors"]


@functools.lru_cache(maxsize=16)
def base_linear_shapes(base_dir: Path) -> dict[str, tuple[int, int]]:
    """Module name -> (out_features, in_features) of every linear layer inside the decoder layers.
    Cached: a base model's files never change under a process that serves or trains on it, and
    every adapter load checks against them. Callers must not modify the result."""
    shapes = {}
    for file in base_weight_files(base_dir):
        for name, info in read_safetensors_header(file).items():
            if ".layers." in name and name.endswith(".weight") and len(info["shape"]) == 2:
                shapes[name.removesuffix(".weight")] = tuple(info["shape"])
    return shapes


def _pattern_value(patterns: dict, module: str, default):
    for key, value in (patterns or {}).items():
        if module == key or module.endswith("." + key):
            return value
    return default


def check_adapter_dir(
    adapter_dir: Path, base_dir: Path, header: dict[str, dict] | None = None
) -> dict[str, LoraModuleSpec]:
    """Module name -> rank and scale of a plain LoRA adapter whose tensors fit the base model.
    `header`: the weights file's safetensors header, if the caller has read it already."""
    for name in ADAPTER_FILES:
        if not (adapter_dir / name).is_file():
            raise AdapterFileError(f"the adapter directory has no {name}")
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except ValueError as exc:
        raise AdapterFileError("adapter_config.json is not valid JSON") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFileError(f"only LoRA adapters are served, not {config.get('peft_type')}")
    for key, allowed in (
        ("use_dora", False),
        ("bias", "none"),
        ("modules_to_save", None),
        ("fan_in_fan_out", False),
    ):
        if config.get(key, allowed) not in (allowed, [] if allowed is None else allowed):
            raise AdapterFileError(f"adapter_config.json: {key}={config[key]!r} is not supported")
    if header is None:
        header = read_safetensors_header(adapter_dir / WEIGHTS_FILE)
    base_shapes = base_linear_shapes(base_dir)
    pairs: dict[str, dict[str, list[int]]] = {}
    for name, info in header.items():
        module, _, part = name.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if part not in ("A.weight", "B.weight") or module not in base_shapes:
            raise AdapterFileError(f"unexpected tensor {name} in adapter_model.safetensors")
        pairs.setdefault(module, {})[part[0]] = info["shape"]
    specs = {}
    for module, parts in pairs.items():
        if set(parts) != {"A", "B"}:
            raise AdapterFileError(f"{module} has lora_A or lora_B missing")
        out_features, in_features = base_shapes[module]
        rank = parts["A"][0]
        if parts["A"] != [rank, in_features] or parts["B"] != [out_features, rank]:
            raise AdapterFileError(
                f"{module}: LoRA shapes {parts['A']} and {parts['B']} do not fit the base "
                f"layer ({out_features}x{in_features}); was it trained on another base model?"
            )
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
        divisor = math.sqrt(rank) if config.get("use_rslora") else rank
        specs[module] = LoraModuleSpec(rank=rank, scale=alpha / divisor)
    if not specs:
        raise AdapterFileError("adapter_model.safetensors holds no LoRA tensors")
    dtypes = sorted({info["dtype"] for info in header.values()})
    if len(dtypes) > 1 or dtypes[0] not in SERVED_DTYPES:
        raise AdapterFileError(
            f"adapter_model.safetensors holds {'/'.join(dtypes)} tensors; save all LoRA tensors in "
            f"one of {', '.join(SERVED_DTYPES)}"
        )
    return specs


def verify_manifest(adapter_dir: Path, version: str, data) -> None:
    """`data`, the bytes of the weights file (read or mapped), must be the version the model id
    points at: the manifest's sha256 must be the version, and `data` must match the manifest's
    block digests (hashed in parallel) or, in manifests written before those, its sha256."""
    try:
        manifest = json.loads((adapter_dir / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise AdapterFileError("the adapter's manifest.json is missing or unreadable") from exc
    blocks = manifest.get("sha256_blocks")
    # The manifest's own sha256 first: when it is not the version, nothing needs hashing.
    intact = manifest.get("sha256") == version and (
        _blocks_match(memoryview(data), blocks["block_bytes"], blocks["digests"])
        if blocks
        else hashlib.sha256(data).hexdigest() == version  # a manifest from before block digests
    )
    if not intact:
        raise AdapterFileError(
            "adapter_model.safetensors does not match its manifest sha256 (corrupt or truncated)"
        )


def _blocks_match(data: memoryview, block_bytes: int, digests: list[str]) -> bool:
    """Every block matches its digest, and there are as many blocks as digests (so a file cut
    at a block boundary, or grown by whole blocks, does not match either)."""

    def digest(start: int) -> str:
        return hashlib.sha256(data[start : start + block_bytes]).hexdigest()

    return list(_BLOCK_HASHERS.map(digest, range(0, len(data), block_bytes))) == digests
