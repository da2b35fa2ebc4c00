"""Operator count and CPU time of one training step: the fused LoRA forward against PEFT's own.

python3 bench/train_ops.py [--examples 8] [--steps 3]
On the GPU the training step is launch-bound (docs/BENCHMARKS.md), so the number of aten
operators a step dispatches (each at least one kernel launch on CUDA) is what the fused forward
(worker/lora_forward.py) is meant to cut. This counts them with a TorchDispatchMode on the CPU,
where the count is exact and needs no GPU: the embedded SmolLM2-135M in NF4, r=16 all-linear
LoRA with dropout 0.05, the worker's own `attach_lora` and `train_step`. CPU seconds per step are
printed too (same run, same data); they are not the GPU figure.
"""

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from app.core.base_models import resolve_base_model  # noqa: E402
from app.core.settings import EMBEDDED_BASE_MODEL, Settings  # noqa: E402
from worker import pipeline  # noqa: E402
from worker.data import Example  # noqa: E402


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def measure(base_dir: Path, fused: bool, examples: list[Example], steps: int) -> dict:
    cfg = pipeline.bench_config(base_dir, device="cpu", batch_size=len(examples), max_seq_length=256)
    model = pipeline.attach_lora(pipeline.load_base_model(base_dir, "cpu"), cfg)
    if not fused:
        for module in model.modules():
            module.__dict__.pop("forward", None)  # back to PEFT's LoRA forward
    model.train()
    counter = OpCounter()
    with counter:
        pipeline.train_step(model, examples, 0, cfg)
    model.zero_grad(set_to_none=True)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        pipeline.train_step(model, examples, 0, cfg)
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return {"ops": counter.ops, "seconds": sorted(times)[len(times) // 2]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    cache = Settings(data_dir=Path(tempfile.gettempdir()) / "tf-ops")
    base_dir = resolve_base_model(EMBEDDED_BASE_MODEL, cache)
    rnd = random.Random(0)
    examples = []
    for _ in range(a.examples):
        ids = [rnd.randrange(3, 40_000) for _ in range(rnd.randint(60, 200))]
        examples.append(Example(ids, list(ids)))
    peft = measure(base_dir, False, examples, a.steps)
    fused = measure(base_dir, True, examples, a.steps)
    runs = {"peft": peft, "fused": fused}
    total = {name: sum(r["ops"].values()) for name, r in runs.items()}
    changed = {
        op: [peft["ops"][op], fused["ops"][op]]
        for op in sorted(set(peft["ops"]) | set(fused["ops"]), key=lambda o: fused["ops"][o] - peft["ops"][o])
        if peft["ops"][op] != fused["ops"][op]
    }
    print(
        json.dumps(
            {
                "aten_ops_per_step": total,
                "ops_ratio_fused_over_peft": round(total["fused"] / total["peft"], 3),
                "changed_ops_peft_vs_fused": changed,
                "cpu_seconds_per_step": {name: round(r["seconds"], 3) for name, r in runs.items()},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
