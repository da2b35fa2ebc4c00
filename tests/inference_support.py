"""Test adapters for the inference engine: PEFT-format LoRA weights with a fixed seed (B nonzero so
outputs differ from the base), published to the artifact store with a Model row, and read back."""

import json
import secrets
import shutil
from pathlib import Path

import torch
from safetensors.torch import load, save_file
from sqlalchemy.orm import Session

from app.core.adapter_files import (
    PEFT_PREFIX,
    AdapterGone,
    base_linear_shapes,
    check_adapter_dir,
    verify_manifest,
)
from app.core.artifacts import WEIGHTS_FILE, publish_dir, sha256_file, temp_sibling, write_manifest
from app.core.db import make_engine
from app.core.settings import EMBEDDED_BASE_MODEL, Settings
from app.inference.decoder import Chunk
from app.inference.lora import Weights
from app.inference.messages import AdapterRef, Completion, Failure, GenerationRequest, SamplingParams
from app.models import Model
from app.services.keys import create_key, get_or_create_tenant

DEFAULT_TARGETS = ("q_proj", "v_proj")


def write_peft_adapter(
    directory: Path,
    base_dir: Path,
    seed: int,
    rank: int = 8,
    alpha: int = 16,
    targets: tuple[str, ...] = DEFAULT_TARGETS,
    std: float = 0.05,
) -> Path:
    """Write adapter_config.json and adapter_model.safetensors as peft's save_pretrained does."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_features, in_features) in sorted(base_linear_shapes(base_dir).items()):
        if module.rsplit(".", 1)[-1] in targets:
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = (
                torch.randn(rank, in_features, generator=generator) * std
            )
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = (
                torch.randn(out_features, rank, generator=generator) * std
            )
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_dir),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def load_adapter_weights(ref: AdapterRef, base_dir: Path) -> Weights:
    """Verified weights of one adapter on the CPU, read plainly: the reference the engine's
    load_adapter_staged is checked against. Module name -> (A, B, scale)."""
    if not ref.adapter_dir.is_dir():
        raise AdapterGone("the adapter's files are gone (the model was deleted)")
    # One read: the bytes that are hashed are the bytes that are loaded.
    data = (ref.adapter_dir / WEIGHTS_FILE).read_bytes()
    verify_manifest(ref.adapter_dir, ref.version, data)
    specs = check_adapter_dir(ref.adapter_dir, base_dir)
    tensors = load(data)
    weights = {}
    for module, spec in specs.items():
        prefix = PEFT_PREFIX + module
        weights[module] = (tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"], spec.scale)
    return weights


def publish_adapter_files(settings: Settings, seed: int, **kw) -> Path:
    """A seeded adapter in the artifact store, adapters/<sha256>/ with its manifest."""
    base_dir = settings.base_models_dir / EMBEDDED_BASE_MODEL
    staging = settings.data_dir / "staging" / secrets.token_hex(4)
    write_peft_adapter(staging, base_dir, seed, **kw)
    version = sha256_file(staging / "adapter_model.safetensors")
    final = settings.adapters_dir / version
    if not final.exists():
        tmp = temp_sibling(final)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(staging / name, tmp / name)
        write_manifest(tmp, base_model=EMBEDDED_BASE_MODEL)
        publish_dir(tmp, final)
    shutil.rmtree(staging)
    return final


def publish_test_adapter(
    settings: Settings,
    tenant_name: str,
    model_id: str,
    seed: int,
    kind: str = "fine_tune",
    **kw,
) -> Model:
    """Publish a seeded adapter and point `model_id` of the tenant at it."""
    final = publish_adapter_files(settings, seed, **kw)
    version = final.name
    engine = make_engine(settings.resolved_database_url)
    try:
        with Session(engine, expire_on_commit=False) as session, session.begin():
            tenant = get_or_create_tenant(session, tenant_name)
            row = Model(
                id=model_id,
                tenant_id=tenant.id,
                base_model=EMBEDDED_BASE_MODEL,
                kind=kind,
                version=version,
                path=str(final.relative_to(settings.data_dir)),
            )
            session.add(row)
    finally:
        engine.dispose()
    return row


def create_test_key(settings: Settings, tenant_name: str) -> str:
    engine = make_engine(settings.resolved_database_url)
    try:
        with Session(engine) as session, session.begin():
            return create_key(session, tenant_name)[1]
    finally:
        engine.dispose()


def prefill_rows(decoder, prompts: list[list[int]], slots: list[int]):
    """Prefill each prompt in one chunk into a row of its own blocks (a whole context each; block 0
    is the decoder's scratch). Returns (logits, greedy, blocks per row)."""
    per = decoder.max_blocks
    blocks = [list(range(1 + row * per, 1 + (row + 1) * per)) for row in range(len(prompts))]
    chunks = [Chunk(p, 0, s, b) for p, s, b in zip(prompts, slots, blocks, strict=True)]
    logits, greedy = decoder.prefill(chunks)
    return logits, greedy, blocks


async def generate(engine, prompt, ref=None, max_tokens=8, on_token=None, **params) -> str:
    """Text of one request straight to an in-process engine, greedy unless `params` (SamplingParams'
    fields) say otherwise; on_token(text so far) per delta."""
    params = SamplingParams(max_tokens, **{"temperature": 0.0, **params})
    stream = engine.submit(GenerationRequest("test", engine.encode_prompt(prompt), params, ref))
    text = ""
    while True:
        event = await stream.get()
        if isinstance(event, Failure):
            raise event.error
        if isinstance(event, Completion):
            return text
        text += event.text
        if on_token:
            on_token(text)
