"""Attention over the paged KV cache: the PyTorch paths against a dense float64 reference over
contiguous keys and values, the Triton kernels against the PyTorch paths (under Triton's CPU
interpreter here, on real model shapes and inside a CUDA graph on a GPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.inference.paged_attention import (
    BLOCK_SIZE,
    _decode_torch,
    _decode_triton,
    _splits,
    _write_kv_triton,
    blocks_for,
    paged_decode_attention,
    paged_prefill_attention,
    write_kv,
)

REPO = Path(__file__).resolve().parents[2]
# Padding rows, a single key, around one block boundary, and several blocks.
LENGTHS = [0, 1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 5 * BLOCK_SIZE + 3]
# (window, softcap): full attention, a sliding window, Gemma 2's soft-capping, both.
VARIANTS = [(None, None), (7, None), (None, 30.0), (20, 50.0)]
# On CUDA decode runs the Triton kernels, prefill the same PyTorch code as on the CPU.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def paged_case(lengths, kv_heads, group, dim, dtype=torch.float32, device="cpu", width=None, seed=0):
    """Dense per-row keys/values (batch, width * BLOCK_SIZE, kv_heads, dim), the same scattered
    over shuffled blocks of a paged cache, and queries (batch, kv_heads * group, dim). Table
    entries past a row's blocks point at block 0, which holds other values (a stale sequence)."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    width = width or max(blocks_for(max(lengths)), 1)
    shape = (batch, width * BLOCK_SIZE, kv_heads, dim)
    keys, values = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    num_blocks = batch * width + 4
    tables = (torch.randperm(num_blocks - 1, generator=gen)[: batch * width] + 1).view(batch, width)
    for row, length in enumerate(lengths):
        tables[row, blocks_for(length) :] = 0
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, dim, generator=gen)
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, dim, generator=gen)
    used = tables != 0
    k_cache[tables[used]] = keys.view(batch, width, BLOCK_SIZE, kv_heads, dim)[used]
    v_cache[tables[used]] = values.view(batch, width, BLOCK_SIZE, kv_heads, dim)[used]
    q = torch.randn(batch, kv_heads * group, dim, generator=gen)
    return {
        "q": q.to(device, dtype),
        "k_cache": k_cache.to(device, dtype),
        "v_cache": v_cache.to(device, dtype),
        "block_tables": tables.to(device, torch.int32),
        "lengths": torch.tensor(lengths, dtype=torch.int32, device=device),
        "keys": keys.to(dtype),
        "values": values.to(dtype),
    }


def dense_reference(q, keys, values, start, lengths, scale, window=None, softcap=None):
    """float64 attention of q (batch, q_len, heads, dim), query i of row b at start[b] + i, over
    the row's first lengths[b] contiguous keys; a query that sees no key gives zeros."""
    q, keys, values = q.double().cpu(), keys.double().cpu(), values.double().cpu()
    group = q.shape[2] // keys.shape[2]
    out = torch.zeros_like(q)
    for row in range(q.shape[0]):
        n = int(lengths[row])
        k = keys[row, :n].repeat_interleave(group, dim=1)
        v = values[row, :n].repeat_interleave(group, dim=1)
        positions = int(start[row]) + torch.arange(q.shape[1])[:, None]
        visible = torch.arange(n) <= positions
        if window is not None:
            visible &= torch.arange(n) > positions - window
        scores = torch.einsum("qhd,khd->hqk", q[row], k) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num()
        out[row] = torch.einsum("hqk,khd->qhd", probs, v)
    return out


def decode_reference(case, scale, window=None, softcap=None):
    lengths = case["lengths"].cpu()
    return dense_reference(
        case["q"][:, None], case["keys"], case["values"], lengths - 1, lengths, scale, window, softcap
    )[:, 0]


def decode_args(case):
    return case["q"], case["k_cache"], case["v_cache"], case["block_tables"], case["lengths"]


def test_blocks_for_rounds_up():
    assert [blocks_for(n) for n in (0, 1, BLOCK_SIZE, BLOCK_SIZE + 1)] == [0, 1, 1, 2]


# 528 programs wanted; a batch of one fills them with one split per tile (up to MAX_SPLITS).
@pytest.mark.parametrize(
    "batch,kv_heads,max_keys,expected", [(1, 4, 2048, 32), (1, 8, 16, 1), (16, 4, 512, 8), (64, 8, 2048, 2)]
)
def test_splits_cover_the_table_in_whole_tiles(batch, kv_heads, max_keys, expected):
    splits, split_len = _splits(batch, kv_heads, max_keys, tile=64, programs=528)
    assert splits == expected and split_len % 64 == 0
    assert (splits - 1) * split_len < max_keys <= splits * split_len


def test_write_kv_stores_at_the_slots_and_skips_negative_ones():
    k_cache, v_cache = torch.zeros(4, BLOCK_SIZE, 2, 8), torch.zeros(4, BLOCK_SIZE, 2, 8)
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    write_kv(k_cache, v_cache, k, v, torch.tensor([2 * BLOCK_SIZE + 5, -1, 3]))
    assert torch.equal(k_cache[2, 5], k[0]) and torch.equal(v_cache[2, 5], v[0])
    assert torch.equal(k_cache[0, 3], k[2]) and torch.equal(v_cache[0, 3], v[2])
    assert k_cache.count_nonzero() == k[[0, 2]].count_nonzero()


@pytest.mark.parametrize("window,softcap", VARIANTS)
@pytest.mark.parametrize("group,dim", [(1, 64), (4, 128), (8, 256), (8, 64)])
@pytest.mark.parametrize("device", DEVICES)
def test_decode_matches_the_dense_reference(device, group, dim, window, softcap):
    case = paged_case(LENGTHS, kv_heads=2, group=group, dim=dim, device=device, seed=group * dim)
    scale = dim**-0.5
    out = paged_decode_attention(*decode_args(case), scale, window, softcap)
    assert out.shape == case["q"].shape and out.dtype == torch.float32
    reference = decode_reference(case, scale, window, softcap)
    torch.testing.assert_close(out.double().cpu(), reference, atol=1e-5, rtol=1e-5)
    assert not out[0].any()  # the padding row of length 0


@pytest.mark.parametrize("window,softcap", VARIANTS)
@pytest.mark.parametrize("device", DEVICES)
def test_decode_in_bf16_is_close_to_the_reference(device, window, softcap):
    case = paged_case(LENGTHS, kv_heads=2, group=4, dim=128, dtype=torch.bfloat16, device=device)
    out = paged_decode_attention(*decode_args(case), 128**-0.5, window, softcap)
    assert out.dtype == torch.bfloat16
    reference = decode_reference(case, 128**-0.5, window, softcap)
    torch.testing.assert_close(out.double().cpu(), reference, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("window,softcap", VARIANTS)
@pytest.mark.parametrize("group,dtype", [(4, torch.float32), (1, torch.bfloat16)])
@pytest.mark.parametrize("device", DEVICES)
def test_prefill_chunks_match_the_dense_reference(device, group, dtype, window, softcap):
    # A first chunk, a chunk after one full block, one crossing blocks, and a padding row.
    start, chunk = [0, BLOCK_SIZE, BLOCK_SIZE + 5, 0], [5, 7, 2 * BLOCK_SIZE, 0]
    lengths = [s + n for s, n in zip(start, chunk, strict=True)]
    case = paged_case(lengths, kv_heads=2, group=group, dim=64, dtype=dtype, device=device, seed=group)
    q = torch.randn(len(lengths), max(chunk), 2 * group, 64).to(device, dtype)
    start = torch.tensor(start, dtype=torch.int32, device=device)
    args = case["k_cache"], case["v_cache"], case["block_tables"], start, case["lengths"]
    out = paged_prefill_attention(q, *args, 0.125, window, softcap)
    assert out.shape == q.shape and out.dtype == dtype and out.isfinite().all()
    reference = dense_reference(q, case["keys"], case["values"], start, lengths, 0.125, window, softcap)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for row, n in enumerate(chunk):  # queries past a row's chunk are padding
        torch.testing.assert_close(
            out[row, :n].double().cpu(), reference[row, :n], atol=tolerance, rtol=tolerance
        )


def interpreter_checks() -> None:
    """The Triton kernels on CPU tensors against the PyTorch paths; run with TRITON_INTERPRET=1."""
    lengths = LENGTHS + [11 * BLOCK_SIZE + 7]
    # float16, not bfloat16: the interpreter's tl.dot gives garbage on bfloat16 (Triton 3.9).
    cases = [(1, 64, torch.float32, *variant) for variant in VARIANTS] + [
        (7, 96, torch.float32, 7, None),  # Qwen2.5-7B's group, Phi-3's head_dim
        (8, 256, torch.float16, 20, 50.0),
    ]
    for group, dim, dtype, window, softcap in cases:
        case = paged_case(lengths, kv_heads=2, group=group, dim=dim, dtype=dtype, seed=dim)
        expected = _decode_torch(*decode_args(case), dim**-0.5, window, softcap).float()
        tolerance = 1e-5 if dtype == torch.float32 else 2e-3
        # One program per (row, KV head): no split; many: every tile its own split.
        for programs in (1, 1000):
            out = _decode_triton(*decode_args(case), dim**-0.5, window, softcap, programs=programs)
            assert out.dtype == dtype
            torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)
            assert not out[0].any()
    k_cache, v_cache = torch.zeros(3, BLOCK_SIZE, 2, 96), torch.zeros(3, BLOCK_SIZE, 2, 96)
    k, v = torch.randn(5, 2, 96), torch.randn(5, 2, 96)
    slots = torch.tensor([0, -1, BLOCK_SIZE + 3, 2 * BLOCK_SIZE + BLOCK_SIZE - 1, -1])
    _write_kv_triton(k_cache, v_cache, k, v, slots)
    expected_k, expected_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    write_kv(expected_k, expected_v, k, v, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_triton_kernels_match_the_torch_paths_under_the_interpreter():
    # The interpreter is chosen when triton is imported: a fresh process.
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    code = "from tests.unit.test_paged_attention import interpreter_checks; interpreter_checks()"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]


# (q heads, KV heads, head_dim, window, softcap)
MODEL_SHAPES = {
    "tinyllama": (32, 4, 64, None, None),
    "mistral7b": (32, 8, 128, None, None),
    "mistral7b-window": (32, 8, 128, 512, None),
    "gemma2": (16, 8, 256, 1000, 50.0),
}


def fp32_torch_decode(case, scale, window, softcap):
    q, k_cache, v_cache, tables, lengths = decode_args(case)
    return _decode_torch(q.float(), k_cache.float(), v_cache.float(), tables, lengths, scale, window, softcap)


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [[2048], [0, 1, 15, 16, 17, 300, 1500, 2047]], ids=["one-long", "mixed"])
@pytest.mark.parametrize("shape", MODEL_SHAPES)
def test_triton_decode_matches_torch_on_model_shapes(shape, lengths):
    heads, kv_heads, dim, window, softcap = MODEL_SHAPES[shape]
    case = paged_case(
        lengths, kv_heads, heads // kv_heads, dim, torch.bfloat16, "cuda", width=blocks_for(2048)
    )
    out = paged_decode_attention(*decode_args(case), dim**-0.5, window, softcap)
    expected = fp32_torch_decode(case, dim**-0.5, window, softcap)
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
def test_triton_write_kv_matches_torch():
    k_cache = torch.zeros(64, BLOCK_SIZE, 8, 128, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    k, v = torch.randn(2, 100, 8, 128, dtype=torch.bfloat16, device="cuda").unbind()
    slots = torch.randperm(64 * BLOCK_SIZE, device="cuda")[:100]
    slots[::7] = -1
    write_kv(k_cache, v_cache, k, v, slots)
    expected_k, expected_v = torch.zeros_like(k_cache).cpu(), torch.zeros_like(v_cache).cpu()
    write_kv(expected_k, expected_v, k.cpu(), v.cpu(), slots.cpu())
    assert torch.equal(k_cache.cpu(), expected_k) and torch.equal(v_cache.cpu(), expected_v)


def capture(step):
    """(graph, outputs) of step() captured after a warm-up run (the compile) on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


@pytest.mark.gpu
def test_decode_replays_in_a_cuda_graph_with_new_lengths_and_tables():
    heads, kv_heads, dim, batch, width = 32, 8, 128, 4, 64
    case = paged_case([width * BLOCK_SIZE] * batch, kv_heads, heads // kv_heads, dim, torch.bfloat16, "cuda")
    q, k_cache, v_cache, tables, lengths = decode_args(case)
    new_k, new_v = torch.zeros(2, batch, kv_heads, dim, dtype=torch.bfloat16, device="cuda").unbind()
    slots = torch.zeros(batch, dtype=torch.long, device="cuda")

    def step():
        write_kv(k_cache, v_cache, new_k, new_v, slots)
        return paged_decode_attention(q, k_cache, v_cache, tables, lengths, dim**-0.5)

    graph, out = capture(step)
    gen = torch.Generator().manual_seed(1)
    for trial in range(3):
        new_lengths = torch.randint(1, width * BLOCK_SIZE, (batch,), generator=gen)
        new_lengths[trial] = 0  # a padding row
        shuffled = torch.randperm(k_cache.shape[0] - 1, generator=gen)[: batch * width] + 1
        lengths.copy_(new_lengths)
        tables.copy_(shuffled.view(batch, width))
        q.copy_(torch.randn(q.shape, generator=gen))
        new_k.copy_(torch.randn(new_k.shape, generator=gen))
        new_v.copy_(torch.randn(new_v.shape, generator=gen))
        last = (new_lengths - 1).clamp(min=0)
        block = tables.cpu().gather(1, (last // BLOCK_SIZE)[:, None])[:, 0]
        slots.copy_(torch.where(new_lengths > 0, block * BLOCK_SIZE + last % BLOCK_SIZE, -1))
        graph.replay()
        torch.cuda.synchronize()
        real = lengths > 0
        assert torch.equal(k_cache.view(-1, kv_heads, dim)[slots[real]], new_k[real])
        assert torch.equal(v_cache.view(-1, kv_heads, dim)[slots[real]], new_v[real])
        expected = fp32_torch_decode(case, dim**-0.5, None, None)
        torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)
        assert not out[trial].any()


@pytest.mark.gpu
def test_prefill_replays_in_a_cuda_graph_with_new_chunks():
    heads, kv_heads, dim, batch, chunk, width = 16, 8, 256, 3, 32, 16
    case = paged_case([width * BLOCK_SIZE] * batch, kv_heads, heads // kv_heads, dim, torch.bfloat16, "cuda")
    _, k_cache, v_cache, tables, lengths = decode_args(case)
    q = torch.zeros(batch, chunk, heads, dim, dtype=torch.bfloat16, device="cuda")
    start = torch.zeros(batch, dtype=torch.int32, device="cuda")
    window, softcap = 100, 50.0
    graph, out = capture(
        lambda: paged_prefill_attention(q, k_cache, v_cache, tables, start, lengths, 0.0625, window, softcap)
    )

    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        new_start = torch.randint(0, width * BLOCK_SIZE - chunk, (batch,), generator=gen)
        shuffled = torch.randperm(k_cache.shape[0] - 1, generator=gen)[: batch * width] + 1
        tables.copy_(shuffled.view(batch, width))
        start.copy_(new_start)
        lengths.copy_(new_start + chunk)
        q.copy_(torch.randn(q.shape, generator=gen))
        graph.replay()
        torch.cuda.synchronize()
        keys = k_cache[tables.long()].flatten(1, 2)
        values = v_cache[tables.long()].flatten(1, 2)
        reference = dense_reference(q, keys, values, new_start, new_start + chunk, 0.0625, window, softcap)
        torch.testing.assert_close(out.double().cpu(), reference, atol=2e-2, rtol=2e-2)
