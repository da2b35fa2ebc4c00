"""Where a training step's time goes: GPU time by kernel family and how busy the GPU is.

python3 bench/profile_train.py [--model-shape SHAPE] [--steps 10] [--variants a,b] [--no-profile]
Each variant runs `worker.pipeline.bench_train` (the worker's own recipe, the benchmark's data) for
--steps steps and reports tokens/s and peak memory; then two steps of it run under torch.profiler and
the GPU time is summed by kernel family (GEMM, NF4 dequantize, attention, optimizer, the rest) next to
the host time of those steps. Variants change one thing each, to see what it is worth:
  default      what the worker runs
  unfused      without worker/fused_kernels.py (transformers' norms, MLP, rotary and SDPA)
  nodropout    lora_dropout 0
  peftdropout  LoRA dropout as PEFT runs it (a dropout kernel, then lora_A), not worker/lora_dropout.py
  nockptN      no gradient checkpointing, MICRO_BATCH_TOKENS N (default 4096)
  bnbbase      the frozen NF4 layers through bitsandbytes' Linear4bit forward, not worker/lora_forward.py's
Prints one JSON line per variant; merges nothing.
"""

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from worker.memory import cuda_allocator_environment

os.environ.update(cuda_allocator_environment())  # as the worker's; PyTorch reads it at import
import torch

from bench.shapes import SHAPES, build_checkpoint
from bench.train import WARM, synthetic_examples
from worker import lora_forward, pipeline

FAMILIES = [
    ("dequantize", ("dequantize", "kDequant")),
    ("attention", ("fmha", "flash", "attention", "cudnn", "sdpa", "efficient")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90", "sm100", "splitk")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
]


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k.lower() in low for k in keys):
            return fam
    return "other"


def variant_settings(name: str):
    """(hyperparameters, MICRO_BATCH_TOKENS, model hook, fused kernels on, fused dropout on) for a
    variant."""
    if name in ("default", "bnbbase"):
        return {}, pipeline.MICRO_BATCH_TOKENS, None, True, True
    if name == "unfused":
        return {}, pipeline.MICRO_BATCH_TOKENS, None, False, True
    if name == "peftdropout":
        return {}, pipeline.MICRO_BATCH_TOKENS, None, True, False
    if name == "nodropout":
        return {"lora_dropout": 0.0}, pipeline.MICRO_BATCH_TOKENS, None, True, True
    if name.startswith("nockpt"):
        tokens = int(name.removeprefix("nockpt") or 4096)
        return {}, tokens, lambda model: model.gradient_checkpointing_disable(), True, True
    raise SystemExit(f"unknown variant {name}")


def run_variant(name, checkpoint, data, steps, batch_size, profiled=True):
    hp, budget, hook, fused, fused_dropout = variant_settings(name)
    original_load, original_budget = pipeline.load_base_model, pipeline.MICRO_BATCH_TOKENS
    original_fused, original_fusable = pipeline.use_fused_kernels, lora_forward._fusable
    original_frozen = lora_forward.frozen_quantized

    def load(base_dir, device):
        model = original_load(base_dir, device)
        if hook:
            hook(model)
        return model

    pipeline.load_base_model, pipeline.MICRO_BATCH_TOKENS = load, budget
    if not fused:
        pipeline.use_fused_kernels = lambda model: 0
    if not fused_dropout:
        lora_forward._fusable = lambda x, lora_A, dropout: False
    if name == "bnbbase":
        lora_forward.frozen_quantized = lambda layer: None
    try:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_stats()
        r = pipeline.bench_train(
            data, checkpoint, steps=steps, warmup_steps=WARM, batch_size=batch_size, **hp
        )
        result = {
            "variant": name,
            "tokens_per_s": round(r["tokens"] / r["seconds"], 1),
            "peak_gib": round(r["peak_gib"], 3),
            "micro_batch_tokens": r["micro_batch_tokens"],
            "loss_last": r["loss_trajectory"][-1][1],
            # cudaMalloc/cudaFree calls (a free waits for the whole device) and the allocations that
            # had to free cached blocks first, over all the steps
            "allocator": allocator_counts(before, torch.cuda.memory_stats()),
        }
        if profiled:
            result.update(profile(checkpoint, data, batch_size, hp, load))
        torch.cuda.empty_cache()
    finally:
        pipeline.load_base_model, pipeline.MICRO_BATCH_TOKENS = original_load, original_budget
        pipeline.use_fused_kernels, lora_forward._fusable = original_fused, original_fusable
        lora_forward.frozen_quantized = original_frozen
    print(json.dumps(result), flush=True)
    return result


def allocator_counts(before: dict, after: dict) -> dict:
    keys = {
        "device_allocs": "num_device_alloc",
        "device_frees": "num_device_free",
        "retries": "num_alloc_retries",
    }
    return {name: after.get(key, 0) - before.get(key, 0) for name, key in keys.items()}


def trainer(checkpoint, data, batch_size, hp, load):
    """The worker's recipe set up as bench_train sets it up, for steps run here: (config, model,
    trainable parameters, optimizer, a constant schedule, the examples)."""
    config = pipeline.bench_config(checkpoint, batch_size=batch_size, **hp)
    model = pipeline.attach_lora(load(config.base_model_dir, "cuda"), config)
    config = pipeline.fit_micro_batches(model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = pipeline.make_optimizer(trainable, config)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return config, model, trainable, opt, sched, [pipeline.Example(ids, list(ids)) for ids in data]


def profile(checkpoint, data, batch_size, hp, load):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    config, model, trainable, opt, sched, ex = trainer(checkpoint, data, batch_size, hp, load)

    def step(s):
        pipeline.train_step(model, ex[s * batch_size : (s + 1) * batch_size], 2, config)
        pipeline.optimizer_step(trainable, opt, sched)

    for s in range(2):
        step(s)
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        start = time.perf_counter()
        for s in range(2, 4):
            step(s)
        torch.cuda.synchronize()
        host = time.perf_counter() - start
    by_family, kernels = defaultdict(float), defaultdict(int)
    top = []
    for e in p.key_averages():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.self_device_time_total
        by_family[family(e.key)] += us
        kernels[family(e.key)] += e.count
        top.append((us, e.count, e.key[:90]))
    busy = sum(by_family.values()) / 1e6
    attn = model.config._attn_implementation
    top.sort(reverse=True)
    others = [t for t in top if family(t[2]) == "other"]
    for title, rows in (("all kernels", top), ('"other"', others)):
        print(f"  top {title}:", flush=True)
        for us, count, key in rows[:20]:
            print(f"  {us / 2e3:9.1f} ms/step {count // 2:6d}x  {key}", flush=True)
    return {
        "attn_implementation": attn,
        "profiled_host_s_per_step": round(host / 2, 4),
        "gpu_busy_s_per_step": round(busy / 2, 4),
        "gpu_ms_per_step": {k: round(v / 2e3, 1) for k, v in sorted(by_family.items())},
        "kernels_per_step": {k: v // 2 for k, v in sorted(kernels.items())},
    }


def interleaved(checkpoint, data, steps, batch_size, block, other):
    """Tokens/s of `default` and `other` on one model in one process, switching every `block` steps
    (after WARM steps of default): machines of one kind, and processes on one machine, differ more than
    the variants do. Each block is timed from a synchronized GPU to a synchronized GPU."""
    config, model, trainable, opt, sched, ex = trainer(
        checkpoint, data, batch_size, {}, pipeline.load_base_model
    )
    layers = [m for m in model.modules() if hasattr(m, "_tuneforge_frozen")]
    frozen = [m._tuneforge_frozen for m in layers]
    original_fusable = lora_forward._fusable

    def use(name):
        for m, f in zip(layers, frozen, strict=True):
            m._tuneforge_frozen = None if name == "bnbbase" else f
        fusable = (lambda x, lora_A, dropout: False) if name == "peftdropout" else original_fusable
        lora_forward._fusable = fusable

    times, tokens = defaultdict(float), defaultdict(int)
    s, before = 0, torch.cuda.memory_stats()
    try:
        for b in range(-1, (steps - WARM) // block):
            name = "default" if b < 0 or b % 2 == 0 else other
            use(name)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(WARM if b < 0 else block):
                chunk = ex[(s % (len(ex) // batch_size)) * batch_size :][:batch_size]
                pipeline.train_step(model, chunk, 2, config)
                pipeline.optimizer_step(trainable, opt, sched)
                tokens[name] += sum(len(e.input_ids) for e in chunk) if b >= 0 else 0
                s += 1
            torch.cuda.synchronize()
            if b >= 0:
                times[name] += time.perf_counter() - start
    finally:
        use("default")
    return {
        "interleaved": {n: round(tokens[n] / times[n], 1) for n in times},
        "block": block,
        "steps": s,
        "allocator": allocator_counts(before, torch.cuda.memory_stats()),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-shape", choices=sorted(SHAPES), default="tinyllama")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--variants", default="default,unfused")
    ap.add_argument("--no-profile", action="store_true", help="tokens/s and peak memory only")
    ap.add_argument(
        "--interleave",
        choices=["bnbbase", "peftdropout"],
        help="that variant and default on one model, alternating every --block steps",
    )
    ap.add_argument("--block", type=int, default=4)
    a = ap.parse_args()
    checkpoint = build_checkpoint(a.model_shape)
    data = synthetic_examples(4000, vocab=SHAPES[a.model_shape][1]["vocab_size"])
    if a.interleave:
        print(json.dumps(interleaved(checkpoint, data, a.steps, a.batch_size, a.block, a.interleave)))
        return
    for name in a.variants.split(","):
        try:
            run_variant(name, checkpoint, data, a.steps, a.batch_size, not a.no_profile)
        except Exception as exc:  # noqa: BLE001 -- keep measuring the others (e.g. out of memory)
            print(json.dumps({"variant": name, "failed": repr(exc)[:400]}), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
