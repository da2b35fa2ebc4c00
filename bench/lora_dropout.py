"""LoRA's dropout + shrink, forward and backward: PEFT's way (a dropout kernel, then lora_A under
bf16 autocast) against worker/lora_dropout.py's fused kernels, on the training step's shapes.

python3 bench/lora_dropout.py [--tokens 20480] [--blocks 64x64,128x64]
Shapes: the inputs of the TinyLlama-1.1B (2048, 5632) and Mistral-7B (4096, 14336) LoRA layers,
rank 16, p 0.05. Times are CUDA-event means over 20 repeats after warm-up. --blocks tries the
kernels' BLOCK_M x BLOCK_K. Prints one JSON line per shape; merges nothing.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from worker import lora_dropout


def timed(fn, repeats=20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats * 1e3  # us


def measure(tokens: int, width: int, blocks: list[str]) -> dict:
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(16, width, device="cuda", requires_grad=True)
    grad = torch.randn(tokens, 16, device="cuda", dtype=torch.bfloat16)

    def peft():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h = F.linear(F.dropout(x, 0.05, training=True), weight)
        h.backward(grad)

    def fused():
        lora_dropout.dropout_shrink(x, weight, 0.05).backward(grad)

    result = {"tokens": tokens, "width": width, "peft_us": round(timed(peft), 1)}
    for block in blocks:
        lora_dropout.BLOCK_M, lora_dropout.BLOCK_K = map(int, block.split("x"))
        result[f"fused_{block}_us"] = round(timed(fused), 1)
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=20480)
    ap.add_argument("--blocks", default=f"{lora_dropout.BLOCK_M}x{lora_dropout.BLOCK_K}")
    a = ap.parse_args()
    for width in (2048, 5632, 4096, 14336):
        print(json.dumps(measure(a.tokens, width, a.blocks.split(","))), flush=True)


if __name__ == "__main__":
    main()
