"""GPU microbenchmark of paged_decode_attention against the decode attention it replaces: SDPA over a
contiguous per-row cache whose columns are padded to a power of two (at least 128), with a boolean
mask of the real keys.

    PYTHONPATH=$PWD python bench/paged_attention.py [--out paged_attention.json] [--programs-per-sm 1 2 4]

Every row of a batch holds `context` keys; the paged cache's blocks are shuffled. Each figure is the
mean time of one call replayed in a CUDA graph (as the engine runs it), and the K/V bytes of the
real keys over that time. Small cases sit in the L2 cache, so their GB/s can pass HBM's. The
`max_diff` column is the largest difference between the two outputs, over the same keys and values.
--programs-per-sm overrides paged_attention.PROGRAMS_PER_SM (how many split programs stage 1 aims
at per multiprocessor), to tune it."""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from app.inference.paged_attention import (
    BLOCK_SIZE,
    PROGRAMS_PER_SM,
    _decode_triton,
    _multiprocessors,
    blocks_for,
)

# (q heads, KV heads, head_dim)
SHAPES = {"tinyllama": (32, 4, 64), "mistral7b": (32, 8, 128)}
BATCHES = (1, 16, 64)
CONTEXTS = (128, 512, 2048)
MIN_COLUMNS = 128  # app.inference.decoder's smallest decode bucket


def graph_time_us(fn, calls: int = 20, replays: int = 10) -> float:
    """Mean µs of one fn() call, from `replays` replays of a graph of `calls` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (calls * replays)


def case(shape: str, batch: int, context: int, programs_per_sm: list[int]) -> dict:
    heads, kv_heads, dim = SHAPES[shape]
    width = blocks_for(context)
    num_blocks = batch * width + 1  # block 0: the null block
    cache = dict(dtype=torch.bfloat16, device="cuda")
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, dim, **cache)
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, dim, **cache)
    tables = (torch.randperm(num_blocks - 1, device="cuda") + 1).view(batch, width).int()
    lengths = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, heads, dim, **cache)
    scale = dim**-0.5

    # Today's layout: (batch, kv_heads, columns, head_dim), the same keys in the first columns.
    columns = max(MIN_COLUMNS, 1 << (context - 1).bit_length())
    k_dense = torch.zeros(batch, kv_heads, columns, dim, **cache)
    v_dense = torch.zeros_like(k_dense)
    k_dense[:, :, :context] = k_cache[tables.long()].flatten(1, 2)[:, :context].transpose(1, 2)
    v_dense[:, :, :context] = v_cache[tables.long()].flatten(1, 2)[:, :context].transpose(1, 2)
    mask = (torch.arange(columns, device="cuda") < context).expand(batch, 1, 1, columns)
    q_dense = q.view(batch, kv_heads, heads // kv_heads, dim)

    def dense():
        return F.scaled_dot_product_attention(q_dense, k_dense, v_dense, attn_mask=mask, scale=scale)

    def paged(per_sm: int):
        programs = per_sm * _multiprocessors(q.device)
        return _decode_triton(q, k_cache, v_cache, tables, lengths, scale, None, None, programs)

    gigabytes = 2 * batch * context * kv_heads * dim * k_cache.element_size() / 1e9
    diff = (paged(programs_per_sm[0]).float() - dense().reshape(q.shape).float()).abs().max().item()
    result = {"shape": shape, "batch": batch, "context": context, "max_diff": diff}
    result["dense_us"] = graph_time_us(dense)
    result["dense_gbps"] = gigabytes / (result["dense_us"] * 1e-6)
    for per_sm in programs_per_sm:
        us = graph_time_us(lambda per_sm=per_sm: paged(per_sm))
        result[f"paged_us@{per_sm}"] = us
        result[f"paged_gbps@{per_sm}"] = gigabytes / (us * 1e-6)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    parser.add_argument("--programs-per-sm", type=int, nargs="+", default=[PROGRAMS_PER_SM])
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    print(f"{torch.cuda.get_device_name()}: µs per call, effective GB/s of K/V read (@ programs per SM)")
    for shape in SHAPES:
        for batch in BATCHES:
            for context in CONTEXTS:
                r = case(shape, batch, context, args.programs_per_sm)
                results.append(r)
                paged = "  ".join(
                    f"paged@{n} {r[f'paged_us@{n}']:8.1f} µs {r[f'paged_gbps@{n}']:7.0f} GB/s"
                    for n in args.programs_per_sm
                )
                print(
                    f"{shape:10} batch {batch:3} context {context:5}  "
                    f"dense {r['dense_us']:8.1f} µs {r['dense_gbps']:7.0f} GB/s  {paged}  "
                    f"max_diff {r['max_diff']:.3g}"
                )
    if args.out:
        args.out.write_text(
            json.dumps({"device": torch.cuda.get_device_name(), "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()
