"""Where an adapter cold load's time goes, stage by stage: the loader thread's work (map the weights
file, verify it against its manifest, check it against the base model, convert it into a staging
buffer) and the engine's copy into a GPU slot. TinyLlama-1.1B-shaped base, r=16 all-linear fp32
adapters (~50 MB), page-cached files as in bench/serve.py; median over 8 adapters per stage.

    PYTHONPATH=$PWD python3 bench/profile_loader.py
"""

import json
import mmap
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from app.core.artifacts import WEIGHTS_FILE
from app.inference.adapters import load_adapter_staged, load_adapter_weights
from app.inference.lora import AdapterPool, stage_weights
from app.services.adapter_files import check_adapter_dir, verify_manifest
from bench.profile_engine import make_adapter
from bench.train import CKPT, build_checkpoint


def median_ms(fn, refs) -> float:
    times = []
    for ref in refs:
        start = time.perf_counter()
        fn(ref)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 1)


def main():
    build_checkpoint()
    base = Path(CKPT)
    root = Path(tempfile.mkdtemp(prefix="tf-loader-"))
    refs = [make_adapter(root, base, seed) for seed in range(8)]
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    load_adapter_staged(refs[0], base, dtype, cuda)  # thread pools, CUDA host allocator, caches

    def verify(ref):
        with open(ref.adapter_dir / WEIGHTS_FILE, "rb") as f:
            verify_manifest(ref.adapter_dir, ref.version, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))

    weights = {ref.version: load_adapter_weights(ref, base) for ref in refs}
    out = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "adapter_mb": round((refs[0].adapter_dir / WEIGHTS_FILE).stat().st_size / 2**20, 1),
        "verify_ms": median_ms(verify, refs),
        "check_adapter_dir_ms": median_ms(lambda ref: check_adapter_dir(ref.adapter_dir, base), refs),
        "stage_pageable_ms": median_ms(lambda ref: stage_weights(weights[ref.version], dtype, False), refs),
    }
    if cuda:
        out["stage_pinned_ms"] = median_ms(lambda ref: stage_weights(weights[ref.version], dtype, True), refs)
        size = sum(a.numel() + b.numel() for a, b, _ in weights[refs[0].version].values())
        kept = []  # a server keeps its staged adapters (CPU tier): each load allocates anew
        out["pinned_alloc_ms"] = median_ms(
            lambda ref: kept.append(torch.empty(size, dtype=dtype, pin_memory=True)), refs
        )
        del kept
    staged = {}
    out["load_adapter_staged_ms"] = median_ms(
        lambda ref: staged.__setitem__(ref.version, load_adapter_staged(ref, base, dtype, cuda)), refs
    )
    if cuda:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).cuda().eval()
        pool = AdapterPool(model, len(refs) + 1, torch.device("cuda"), rank=16)
        slots = {ref.version: i + 1 for i, ref in enumerate(refs)}
        out["pool_write_ms"] = median_ms(
            lambda ref: pool.write(slots[ref.version], staged[ref.version]), refs
        )
        pageable = {ref.version: stage_weights(weights[ref.version], dtype, False) for ref in refs}
        out["pool_write_pageable_ms"] = median_ms(
            lambda ref: pool.write(slots[ref.version], pageable[ref.version]), refs
        )
    shutil.rmtree(root, ignore_errors=True)
    print("loader", json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
