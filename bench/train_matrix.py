"""Configuration matrix + torch.profiler for the Tuneforge training path (one process, GPU 0).

python3 bench/train_matrix.py [--steps 12]   -> prints one JSON line per config, profile tables,
merges train.matrix into docs/benchmarks/latest.json.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._results import merge
from bench.shapes import build_checkpoint, checkpoint_path
from bench.train import WARM, loss_at_tokens, synthetic_examples
from worker import pipeline

CKPT = checkpoint_path("tinyllama")

# name, hyperparameters, MICRO_BATCH_TOKENS, step function ("plain": transformers' padded forward
# and loss through PEFT's own LoRA forward; "peft_lora": the fast path with PEFT's LoRA forward).
CONFIGS = [
    ("plain_b16", {"batch_size": 16}, 16384, "plain"),
    ("fast_b16", {"batch_size": 16}, 16384, "fast"),
    ("fast_b128_peft_lora_forward", {"batch_size": 128}, 16384, "peft_lora"),
    ("fast_b128_mb16k", {"batch_size": 128}, 16384, "fast"),
    ("fast_b128_mb24k", {"batch_size": 128}, 24576, "fast"),
    ("fast_b128_mb24k_nodropout", {"batch_size": 128, "lora_dropout": 0.0}, 24576, "fast"),
    ("fast_b256_mb24k", {"batch_size": 256}, 24576, "fast"),
    ("fast_b256_mb32k", {"batch_size": 256}, 32768, "fast"),
]


def run(name, hp, budget, kind, steps, data):
    original_step, original_forward = pipeline.train_step, pipeline.use_fused_lora_forward
    original_budget, pipeline.MICRO_BATCH_TOKENS = pipeline.MICRO_BATCH_TOKENS, budget
    if kind == "plain":
        pipeline.train_step = pipeline.plain_step
    if kind in ("plain", "peft_lora"):
        pipeline.use_fused_lora_forward = lambda model: 0
    try:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        r = pipeline.bench_train(data, CKPT, steps=steps, warmup_steps=WARM, seed=0, **hp)
    finally:
        pipeline.train_step, pipeline.use_fused_lora_forward = original_step, original_forward
        pipeline.MICRO_BATCH_TOKENS = original_budget
    r.update(
        name=name,
        micro_batch_tokens=budget,
        tokens_per_s=r["tokens"] / r["seconds"],
        loss_at_tokens=loss_at_tokens(r["loss_trajectory"]),
    )
    print(name, json.dumps({k: v for k, v in r.items() if k != "loss_trajectory"}), flush=True)
    return r


def profile(data, batch_size=128):
    """Two steps of the fast path under torch.profiler, top CUDA kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    config = pipeline.bench_config(CKPT, batch_size=batch_size)
    model = pipeline.attach_lora(pipeline.load_base_model(config.base_model_dir, "cuda"), config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = pipeline.make_optimizer(trainable, config)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    ex = [pipeline.Example(ids, list(ids)) for ids in data]
    for s in range(2):
        pipeline.train_step(model, ex[s * batch_size : (s + 1) * batch_size], 2, config)
        pipeline.optimizer_step(trainable, opt, sched)
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for s in range(2, 4):
            pipeline.train_step(model, ex[s * batch_size : (s + 1) * batch_size], 2, config)
            pipeline.optimizer_step(trainable, opt, sched)
        torch.cuda.synchronize()
    print(
        p.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70), flush=True
    )
    del model, opt
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    build_checkpoint()
    data = synthetic_examples(4000)
    results = {}
    for name, hp, budget, kind in CONFIGS:
        try:
            r = run(name, hp, budget, kind, a.steps, data)
            results[name] = {
                k: (round(v, 3) if isinstance(v, float) else v)
                for k, v in r.items()
                if k != "loss_trajectory"
            }
        except Exception as e:  # noqa: BLE001 -- keep measuring the others (e.g. out of memory)
            print(name, "failed", repr(e)[:300], flush=True)
            results[name] = {"failed": repr(e)[:300]}
            torch.cuda.empty_cache()
    merge("train", {"matrix": results})
    if a.profile:
        profile(data)


if __name__ == "__main__":
    main()
