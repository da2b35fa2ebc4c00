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
Prints one JSON line per variant; merges nothing.
"""

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
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
    if name == "default":
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
    try:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        r = pipeline.bench_train(
            data, checkpoint, steps=steps, warmup_steps=WARM, batch_size=batch_size, **hp
        )
        result = {
            "variant": name,
            "tokens_per_s": round(r["tokens"] / r["seconds"], 1),
            "peak_gib": round(r["peak_gib"], 3),
            "micro_batch_tokens": r["micro_batch_tokens"],
            "loss_last": r["loss_trajectory"][-1][1],
        }
        if profiled:
            result.update(profile(checkpoint, data, batch_size, hp, load))
        torch.cuda.empty_cache()
    finally:
        pipeline.load_base_model, pipeline.MICRO_BATCH_TOKENS = original_load, original_budget
        pipeline.use_fused_kernels, lora_forward._fusable = original_fused, original_fusable
    print(json.dumps(result), flush=True)
    return result


def profile(checkpoint, data, batch_size, hp, load):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    config = pipeline.bench_config(checkpoint, batch_size=batch_size, **hp)
    model = pipeline.attach_lora(load(config.base_model_dir, "cuda"), config)
    config = pipeline.fit_micro_batches(model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = pipeline.make_optimizer(trainable, config)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    ex = [pipeline.Example(ids, list(ids)) for ids in data]

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-shape", choices=sorted(SHAPES), default="tinyllama")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--variants", default="default,unfused")
    ap.add_argument("--no-profile", action="store_true", help="tokens/s and peak memory only")
    a = ap.parse_args()
    checkpoint = build_checkpoint(a.model_shape)
    data = synthetic_examples(4000, vocab=SHAPES[a.model_shape][1]["vocab_size"])
    for name in a.variants.split(","):
        try:
            run_variant(name, checkpoint, data, a.steps, a.batch_size, not a.no_profile)
        except Exception as exc:  # noqa: BLE001 -- keep measuring the others (e.g. out of memory)
            print(json.dumps({"variant": name, "failed": repr(exc)[:400]}), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
