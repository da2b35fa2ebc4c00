"""Configuration matrix + torch.profiler for the Tuneforge training path (one process, GPU 0).

python3 bench/train_matrix.py [--steps 12] [--profile]  -> prints one JSON line per config, merges
train.matrix into docs/benchmarks/latest.json; --profile adds bench/profile_train.py's profile of the
worker's default step (top kernels, GPU time by kernel family).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import profile_train
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
        # The step of the worker's default configuration, as bench/profile_train.py profiles it.
        print(json.dumps(profile_train.profile(CKPT, data, 128, {}, pipeline.load_base_model)), flush=True)


if __name__ == "__main__":
    main()
