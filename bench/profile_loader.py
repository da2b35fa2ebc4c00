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
import struct
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from app.core.adapter_files import check_adapter_dir, verify_manifest
from app.core.artifacts import WEIGHTS_FILE
from app.inference.adapters import load_adapter_staged, reserve_pinned_memory
from app.inference.lora import AdapterPool
from bench.profile_engine import make_adapter
from bench.shapes import build_checkpoint


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
    base = Path(build_checkpoint())
    root = Path(tempfile.mkdtemp(prefix="tf-loader-"))
    refs = [make_adapter(root, base, seed) for seed in range(8)]
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    numel = load_adapter_staged(refs[0], base, dtype, cuda).flat.numel()  # pools, allocator, caches

    def mapped(ref):
        with open(ref.adapter_dir / WEIGHTS_FILE, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def convert(ref):  # the loader's bulk conversion, into a buffer allocated beforehand
        data = mapped(ref)
        start = 8 + struct.unpack("<Q", data[:8])[0]
        ready[ref.version].copy_(torch.frombuffer(data, dtype=torch.float32, count=numel, offset=start))

    kept = []  # a server keeps its staged adapters (CPU tier): each buffer is a new allocation
    out = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "adapter_mb": round((refs[0].adapter_dir / WEIGHTS_FILE).stat().st_size / 2**20, 1),
        "torch_threads": torch.get_num_threads(),
        "verify_ms": median_ms(lambda ref: verify_manifest(ref.adapter_dir, ref.version, mapped(ref)), refs),
        "check_adapter_dir_ms": median_ms(lambda ref: check_adapter_dir(ref.adapter_dir, base), refs),
        "staging_buffer_fresh_ms": median_ms(
            lambda ref: kept.append(torch.empty(numel, dtype=dtype, pin_memory=cuda)), refs
        ),
    }
    ready = {ref.version: kept.pop() for ref in refs}
    out["convert_ms"] = median_ms(convert, refs)
    if cuda:
        reserve_pinned_memory(numel, len(refs) + 1, dtype)  # as the engine does at start
        out["staging_buffer_reserved_ms"] = median_ms(
            lambda ref: kept.append(torch.empty(numel, dtype=dtype, pin_memory=True)), refs
        )
        kept.clear()
        reserve_pinned_memory(numel, len(refs) + 1, dtype)
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
    shutil.rmtree(root, ignore_errors=True)
    print("loader", json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
