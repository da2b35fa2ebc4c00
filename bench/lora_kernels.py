"""GPU microbenchmark of the per-token LoRA kernels (app/inference/lora_kernels.py) against the
masked all-slots product (what app/inference/lora.py did before them) and against gather + bmm.

python bench/lora_kernels.py --out F [--models tinyllama mistral7b] [--rank 16] [--prefill-runs]
For each projection group of TinyLlama-1.1B and Mistral-7B (q/k/v fused, gate/up fused, o, down),
T token rows spread over a number of distinct adapters in a pool of S slots (every slot filled,
rank r), bf16: shrink + expand added into the base output y. The 4,096-row case is a prefill
batch, each adapter's rows consecutive (the tile kernels). Times are means of CUDA-graph
replays (a decode step is replayed from a graph, so launch overhead is left out). GB/s counts
the bytes a step must move at least: each distinct adapter's A and B at its rank once, x read, y
read and written."""

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from app.inference import lora_kernels  # noqa: E402
from app.inference.lora_kernels import TILE_MIN_TOKENS, lora_apply  # noqa: E402

# Group -> (in_features, out sizes of the projections that share the input).
MODELS = {
    "tinyllama": {
        "qkv": (2048, (2048, 256, 256)),
        "gate_up": (2048, (5632, 5632)),
        "o": (2048, (2048,)),
        "down": (5632, (2048,)),
    },
    "mistral7b": {
        "qkv": (4096, (4096, 1024, 1024)),
        "gate_up": (4096, (14336, 14336)),
        "o": (4096, (4096,)),
        "down": (14336, (4096,)),
    },
}
TOKENS = (1, 16, 64, 256, 4096)  # decode batches, and one prefill batch (rows in runs per adapter)
ADAPTERS = (1, 16, 64)
SLOTS = (8, 256, 1024)


class Group:
    """One group's pool of `num_slots` rank-R adapters (slot 0 empty), in both layouts."""

    def __init__(self, num_slots: int, R: int, in_features: int, outs: tuple[int, ...]):
        n = len(outs)
        self.R, self.outs = R, outs
        self.out_starts = tuple(sum(outs[:j]) for j in range(n + 1))
        self.A = torch.randn(num_slots, n * R, in_features, device="cuda", dtype=torch.bfloat16)
        self.A /= in_features**0.5
        self.BT = torch.randn(num_slots, R, self.out_starts[-1], device="cuda", dtype=torch.bfloat16)
        self.BT /= R**0.5
        self.A[0] = self.BT[0] = 0
        self.ranks = torch.full((num_slots,), R, dtype=torch.int32, device="cuda")
        self.ranks[0] = 0
        # Today's layout: one (slots, R, in) / (slots, R, out) pair per projection.
        self.per_projection = [
            (self.A[:, j * R : (j + 1) * R].contiguous(), self.BT[..., s:e].contiguous())
            for j, (s, e) in enumerate(zip(self.out_starts, self.out_starts[1:], strict=False))
        ]

    def triton(self, x, y, slots):
        lora_apply(x, y, self.A, self.BT, slots, self.ranks, self.out_starts)

    def masked(self, x, y, mask):
        for (A, BT), s, e in zip(self.per_projection, self.out_starts, self.out_starts[1:], strict=False):
            hidden = torch.nn.functional.linear(x, A.view(-1, A.shape[2])) * mask
            y[:, s:e] += hidden @ BT.view(-1, BT.shape[2])

    def gather_bmm(self, x, y, slots):
        h = torch.bmm(self.A[slots], x.unsqueeze(2)).view(x.shape[0], len(self.outs), 1, self.R)
        BT = self.BT[slots]
        for j, (s, e) in enumerate(zip(self.out_starts, self.out_starts[1:], strict=False)):
            y[:, s:e] += torch.bmm(h[:, j], BT[..., s:e]).squeeze(1)


def time_us(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=20) * 1e3


def run_case(group: Group, T: int, adapters: int, in_features: int) -> dict:
    num_slots = group.A.shape[0]
    chosen = torch.randperm(num_slots - 1, device="cuda")[:adapters] + 1
    if T >= TILE_MIN_TOKENS:  # a prefill batch: each adapter's rows are consecutive
        which = torch.arange(T, device="cuda") * adapters // T
    else:
        which = torch.randperm(T, device="cuda") % adapters
    slots = chosen[which].to(torch.int32)
    mask = torch.zeros(T, num_slots, group.R, device="cuda", dtype=torch.bfloat16)
    mask[torch.arange(T, device="cuda"), slots.long()] = 1
    mask = mask.view(T, -1)
    x = torch.randn(T, in_features, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(T, group.out_starts[-1], device="cuda", dtype=torch.bfloat16)

    expected, got = y.clone(), y.clone()
    group.gather_bmm(x, expected, slots.long())
    group.triton(x, got, slots)
    max_err = (got.float() - expected.float()).abs().max().item()

    element = 2
    moved = (
        adapters * group.R * (group.A.shape[1] // group.R * in_features + group.out_starts[-1])
        + T * (in_features + 2 * group.out_starts[-1])
    ) * element
    result = {"max_abs_err_vs_gather_bmm": max_err, "min_bytes": moved}
    methods = {
        "triton": lambda: group.triton(x, y, slots),
        "masked_all_slots": lambda: group.masked(x, y, mask),
        "gather_bmm": lambda: group.gather_bmm(x, y, slots.long()),
    }
    for name, fn in methods.items():
        us = time_us(fn)
        result[name] = {"us": round(us, 2), "GB/s": round(moved / us / 1e3, 1)}
    return result


def tiles_apply(x, y, A, BT, slots, ranks, out_starts):
    """lora_apply through the tile kernels whatever the number of rows."""
    parts = lora_kernels._triton_shrink(x, A, slots, ranks, len(out_starts) - 1, tiles=True)
    lora_kernels._triton_expand(parts, BT, slots, ranks, out_starts, y, tiles=True)


def prefill_runs(models, rank: int) -> list[dict]:
    """A prefill's rows come in runs of one sequence (one adapter): 1, 4 and 16 sequences of 64
    rows, through the per-row kernels (what lora_apply takes below TILE_MIN_TOKENS rows) and
    through the tile kernels (taken from TILE_MIN_TOKENS on), to check where tiles start to pay."""
    results = []
    for model in models:
        for group_name, (in_features, outs) in MODELS[model].items():
            group = Group(256, rank, in_features, outs)
            for sequences in (1, 4, 16):
                T = 64 * sequences
                slots = (torch.arange(T, device="cuda") // 64 + 1).to(torch.int32)
                x = torch.randn(T, in_features, device="cuda", dtype=torch.bfloat16)
                y = torch.randn(T, group.out_starts[-1], device="cuda", dtype=torch.bfloat16)
                args = (x, y, group.A, group.BT, slots, group.ranks, group.out_starts)
                row = dict(model=model, group=group_name, rows=T, sequences=sequences)
                row["per_row_us"] = round(time_us(lambda args=args: lora_apply(*args)), 2)
                row["tiles_us"] = round(time_us(lambda args=args: tiles_apply(*args)), 2)
                print(row, flush=True)
                results.append(row)
            del group
            torch.cuda.empty_cache()
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prefill-runs", action="store_true", help="only prefill_runs()")
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.prefill_runs:
        doc = {"device": torch.cuda.get_device_name(0), "prefill_runs": prefill_runs(a.models, a.rank)}
        a.out.write_text(json.dumps(doc, indent=1) + "\n")
        return
    results = []
    print(f"{'model':10} {'group':8} {'slots':>5} {'T':>4} {'adapt':>5}   triton µs (GB/s)", end="")
    print("   masked µs   gather µs")
    for model in a.models:
        for group_name, (in_features, outs) in MODELS[model].items():
            for num_slots in SLOTS:
                group = Group(num_slots, a.rank, in_features, outs)
                for T in TOKENS:
                    for adapters in sorted({min(d, T, num_slots - 1) for d in ADAPTERS}):
                        r = run_case(group, T, adapters, in_features)
                        key = dict(model=model, group=group_name, slots=num_slots, tokens=T)
                        results.append({**key, "adapters": adapters, "rank": a.rank, **r})
                        print(
                            f"{model:10} {group_name:8} {num_slots:5} {T:4} {adapters:5}"
                            f"   {r['triton']['us']:8.1f} ({r['triton']['GB/s']:6.0f})"
                            f"   {r['masked_all_slots']['us']:9.1f}   {r['gather_bmm']['us']:9.1f}"
                            f"   err {r['max_abs_err_vs_gather_bmm']:.3f}",
                            flush=True,
                        )
                del group
                torch.cuda.empty_cache()
    doc = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__}
    a.out.write_text(json.dumps({**doc, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
