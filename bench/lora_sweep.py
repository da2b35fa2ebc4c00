"""GPU sweep of the decode LoRA kernels' launch shapes (app/inference/lora_kernels.py): for each
candidate (shrink: in-dimension block, target programs, warps; expand: output columns per program,
warps), the time of that kernel over a whole decode step of T rows on T distinct adapters (rank
16, 256 slots, bf16): the sum over a layer's four groups (q/k/v, o, gate/up, down), times the
number of layers. Means of CUDA-graph replays, as a decode step runs.

python bench/lora_sweep.py --out lora_sweep.json [--models tinyllama mistral7b]"""

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from app.inference import lora_kernels as lk  # noqa: E402
from bench.lora_kernels import MODELS, Group, time_us  # noqa: E402
from bench.shapes import SHAPES  # noqa: E402

ROWS = (1, 16, 64)
SLOTS, RANK = 256, 16
# (SHRINK_BLOCK_K, SHRINK_TARGET_PROGRAMS, SHRINK_WARPS) and (EXPAND_BLOCK_N, EXPAND_WARPS).
SHRINK = [(bk, p, w) for bk in (32, 64, 128, 256) for p in (512, 1024, 2048) for w in (1, 2, 4, 8)]
EXPAND = [(bn, w) for bn in (128, 256, 512, 1024, 2048) for w in (1, 2, 4, 8)]


KNOBS = ("SHRINK_BLOCK_K", "SHRINK_TARGET_PROGRAMS", "SHRINK_WARPS", "EXPAND_BLOCK_N", "EXPAND_WARPS")


def time_group(group: Group, T: int, shrink: dict, expand: dict, layers: int) -> None:
    """Add this group's share of a T-row step to every candidate's total."""
    n, in_features = len(group.outs), group.A.shape[2]
    slots = (torch.randperm(SLOTS - 1, device="cuda")[:T] + 1).to(torch.int32)
    x = torch.randn(T, in_features, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(T, group.out_starts[-1], device="cuda", dtype=torch.bfloat16)
    defaults = {k: getattr(lk, k) for k in KNOBS}
    for c in SHRINK:
        vars(lk).update(SHRINK_BLOCK_K=c[0], SHRINK_TARGET_PROGRAMS=c[1], SHRINK_WARPS=c[2])
        shrink[c][T] += layers * time_us(lambda: lk._triton_shrink(x, group.A, slots, group.ranks, n))
    vars(lk).update(defaults)
    parts = lk._triton_shrink(x, group.A, slots, group.ranks, n)
    for c in EXPAND:
        vars(lk).update(EXPAND_BLOCK_N=c[0], EXPAND_WARPS=c[1])
        expand[c][T] += layers * time_us(
            lambda: lk._triton_expand(parts, group.BT, slots, group.ranks, group.out_starts, y)
        )
    vars(lk).update(defaults)


def sweep(model: str) -> dict:
    shrink = {c: dict.fromkeys(ROWS, 0.0) for c in SHRINK}
    expand = {c: dict.fromkeys(ROWS, 0.0) for c in EXPAND}
    for in_features, outs in MODELS[model].values():
        group = Group(SLOTS, RANK, in_features, outs)
        for T in ROWS:
            time_group(group, T, shrink, expand, SHAPES[model][1]["num_hidden_layers"])
        del group
        torch.cuda.empty_cache()
    current = tuple(getattr(lk, k) for k in KNOBS)
    result = {}
    for kernel, table, now in (("shrink", shrink, current[:3]), ("expand", expand, current[3:])):
        for T in ROWS:
            ranked = sorted(table, key=lambda c, T=T: table[c][T])
            result[f"{kernel}_rows{T}"] = {
                "current": [list(now), round(table[now][T], 1)] if now in table else None,
                "best": [[list(c), round(table[c][T], 1)] for c in ranked[:5]],
                "worst": [list(ranked[-1]), round(table[ranked[-1]][T], 1)],
            }
            print(model, kernel, f"rows {T}", result[f"{kernel}_rows{T}"], flush=True)
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    a = ap.parse_args()
    torch.manual_seed(0)
    doc = {"device": torch.cuda.get_device_name(0), "triton": triton.__version__}
    doc |= {"slots": SLOTS, "rank": RANK, "knobs": KNOBS}
    doc["step_us"] = {model: sweep(model) for model in a.models}
    a.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
