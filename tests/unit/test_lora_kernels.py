"""app.inference.lora_kernels: the CPU path against a naive per-row reference, the Triton kernels
under Triton's interpreter (on CPU tensors, in a subprocess: TRITON_INTERPRET must be set before
triton is imported) against the CPU path, and on a GPU against it on real shapes, eagerly and
replayed from a CUDA graph."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from app.inference import lora_kernels
from app.inference.lora import LoraGroup
from app.inference.lora_kernels import lora_apply, lora_expand, lora_shrink, torch_expand, torch_shrink

REPO = Path(__file__).resolve().parents[2]


def make_pool(num_slots, R, in_features, outs, adapter_ranks, dtype=torch.float32, device="cpu", seed=0):
    """A, BT, ranks, out_starts for a group of len(outs) projections; slot s > 0 holds an adapter
    of rank adapter_ranks[s - 1] (0: empty), zero past its rank; slot 0 stays zero."""
    g = torch.Generator().manual_seed(seed)
    n = len(outs)
    out_starts = tuple(sum(outs[:j]) for j in range(n + 1))
    A = torch.zeros(num_slots, n * R, in_features)
    BT = torch.zeros(num_slots, R, out_starts[-1])
    ranks = torch.zeros(num_slots, dtype=torch.int32)
    for slot, rank in enumerate(adapter_ranks, start=1):
        ranks[slot] = rank
        for j in range(n):
            A[slot, j * R : j * R + rank] = torch.randn(rank, in_features, generator=g) / in_features**0.5
        BT[slot, :rank] = torch.randn(rank, out_starts[-1], generator=g) / rank**0.5
    return A.to(device, dtype), BT.to(device, dtype), ranks.to(device), out_starts


def naive(x, A, BT, slots, out_starts):
    """Row by row, every rank of the pool, in float64."""
    n, R = len(out_starts) - 1, BT.shape[1]
    y = torch.zeros(x.shape[0], BT.shape[2], dtype=torch.float64)
    h = torch.zeros(x.shape[0], n * R, dtype=torch.float64)
    for t, slot in enumerate(slots.tolist()):
        h[t] = x[t].double() @ A[slot].double().T
        for j in range(n):
            seg = slice(out_starts[j], out_starts[j + 1])
            y[t, seg] = h[t, j * R : (j + 1) * R] @ BT[slot, :, seg].double()
    return h, y


# (R, in, outs, adapter ranks of slots 1.., slots of the rows)
CASES = [
    (8, 40, (24,), (8, 3), [1, 0, 2, 1, 2]),
    (16, 72, (48, 16, 16), (16, 8, 0, 5), [3, 1, 0, 2, 2, 4, 1]),
    (32, 100, (70, 30), (32, 12), [2, 2, 2, 1]),
    (16, 64, (50, 14, 14), (16,), [0, 0]),
    # Runs of one slot, as prefill rows come, then mixed rows: tiles of 16 rows hold both kinds.
    (16, 48, (40, 24), (16, 8, 0), [1] * 10 + [2] * 13 + [0] * 5 + [3, 1, 2, 0] * 4),
]


@pytest.mark.parametrize("R,in_features,outs,adapter_ranks,rows", CASES)
def test_torch_path_matches_the_naive_reference(R, in_features, outs, adapter_ranks, rows):
    A, BT, ranks, out_starts = make_pool(len(adapter_ranks) + 1, R, in_features, outs, adapter_ranks)
    slots = torch.tensor(rows)
    x = torch.randn(len(rows), in_features)
    y0 = torch.randn(len(rows), out_starts[-1])
    h_ref, delta_ref = naive(x, A, BT, slots, out_starts)

    h = lora_shrink(x, A, slots, ranks, len(outs))
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-5, atol=1e-6)
    y = lora_expand(h, BT, slots, ranks, out_starts, y0.clone())
    torch.testing.assert_close(y.double(), y0.double() + delta_ref, rtol=1e-5, atol=1e-5)
    y = lora_apply(x, y0.clone(), A, BT, slots, ranks, out_starts)
    torch.testing.assert_close(y.double(), y0.double() + delta_ref, rtol=1e-5, atol=1e-5)
    base_rows = slots == 0
    assert torch.equal(y[base_rows], y0[base_rows])


def test_rows_past_a_slots_rank_are_not_read():
    A, BT, ranks, out_starts = make_pool(3, 16, 32, (20, 12), (4, 16))
    _, delta_ref = naive(x := torch.randn(3, 32), A, BT, slots := torch.tensor([1, 2, 0]), out_starts)
    A[1, 4:16] = A[1, 20:] = BT[1, 4:] = float("nan")  # slot 1 has rank 4: never touched past it
    A[0] = BT[0] = float("nan")
    y = lora_apply(x, torch.zeros(3, 32), A, BT, slots, ranks, out_starts)
    torch.testing.assert_close(y.double(), delta_ref, rtol=1e-5, atol=1e-5)


def test_bf16_adds_in_fp32_and_rounds_once():
    A, BT, ranks, out_starts = make_pool(2, 8, 64, (32,), (8,), dtype=torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    y0 = torch.randn(4, 32, dtype=torch.bfloat16)
    y = lora_apply(x, y0.clone(), A, BT, torch.tensor([1, 1, 0, 1]), ranks, out_starts)
    h = x.float() @ A[1].float().T
    expected = (y0.float() + h @ BT[1].float()).to(torch.bfloat16)
    expected[2] = y0[2]
    torch.testing.assert_close(y, expected, rtol=0, atol=0.02)
    assert y.dtype == torch.bfloat16


def test_shapes_that_do_not_fit_are_refused():
    A, BT, ranks, out_starts = make_pool(2, 8, 16, (8, 8), (8,))
    x, slots = torch.randn(2, 16), torch.tensor([1, 0])
    with pytest.raises(ValueError):
        lora_shrink(x, A, slots, ranks, 3)
    with pytest.raises(ValueError):
        lora_expand(torch.zeros(2, 16), BT, slots, ranks, (0, 10, 16), torch.zeros(2, 8))


# Block sizes small enough that the cases above take several blocks, splits and tiles.
INTERPRETER_BLOCKS = [
    (False, {}),
    (False, dict(SHRINK_BLOCK_K=16, EXPAND_BLOCK_N=16)),
    (False, dict(SHRINK_BLOCK_K=16, EXPAND_BLOCK_N=16, SHRINK_MAX_SPLITS=3)),
    (True, dict(TILE_T=16)),
    (True, dict(TILE_T=16, TILE_K=16, TILE_N=16)),
]


@contextlib.contextmanager
def unwritten_is_nan():
    """torch.empty in lora_kernels returns NaNs, so an entry read before it is written shows."""
    empty = torch.empty

    def nan_empty(*shape, dtype=None, device=None):
        return empty(*shape, dtype=dtype, device=device).fill_(float("nan"))

    with mock.patch.object(lora_kernels.torch, "empty", nan_empty):
        yield


def interpreter_checks() -> None:
    """Run in the subprocess: both Triton paths (interpreted) against the torch path, fp32."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    for R, in_features, outs, adapter_ranks, rows in CASES:
        A, BT, ranks, out_starts = make_pool(len(adapter_ranks) + 1, R, in_features, outs, adapter_ranks)
        slots = torch.tensor(rows, dtype=torch.int32)
        x = torch.randn(len(rows), in_features)
        y0 = torch.randn(len(rows), out_starts[-1])
        h_ref = torch_shrink(x, A, slots, ranks, len(outs))
        y_ref = torch_expand(h_ref, BT, slots, ranks, out_starts, y0.clone())
        for tiles, blocks in INTERPRETER_BLOCKS:
            defaults = {name: getattr(lora_kernels, name) for name in blocks}
            vars(lora_kernels).update(blocks)
            parts = lora_kernels._triton_shrink(x, A, slots, ranks, len(outs), tiles, zeroed=True)
            msg = f"{tiles} {blocks}"
            torch.testing.assert_close(parts.sum(0), h_ref, rtol=1e-5, atol=1e-6, msg=f"shrink {msg}")
            y = y0.clone()
            lora_kernels._triton_expand(h_ref.unsqueeze(0), BT, slots, ranks, out_starts, y, tiles)
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6, msg=f"expand {msg}")
            # What lora_apply hands over: partial sums, entries no kernel reads left as they were.
            with unwritten_is_nan():
                parts = lora_kernels._triton_shrink(x, A, slots, ranks, len(outs), tiles)
            y = y0.clone()
            lora_kernels._triton_expand(parts, BT, slots, ranks, out_starts, y, tiles)
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6, msg=f"shrink + expand {msg}")
            vars(lora_kernels).update(defaults)
    print("ok")


def test_triton_kernels_under_the_interpreter_match_the_torch_path():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    code = "from tests.unit.test_lora_kernels import interpreter_checks; interpreter_checks()"
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr


# (in, outs): TinyLlama qkv / gate-up / down, Mistral-7B qkv / down, Phi-3-mini's fused qkv (3072
# each), and uneven sizes that exercise every mask.
GPU_SHAPES = [
    (2048, (2048, 256, 256)),
    (2048, (5632, 5632)),
    (5632, (2048,)),
    (4096, (4096, 1024, 1024)),
    (14336, (4096,)),
    (3072, (3072, 3072, 3072)),
    (1000, (333, 77, 77)),
]


def gpu_case(T, in_features, outs, R, num_slots=32, dtype=torch.bfloat16, seed=0, runs=False):
    """Rows of random slots (`runs`: sorted, as prefill's sequences come) of mixed ranks."""
    g = torch.Generator().manual_seed(seed)
    adapter_ranks = [int(r) for r in torch.randint(0, R + 1, (num_slots - 1,), generator=g)]
    adapter_ranks[0] = R
    A, BT, ranks, out_starts = make_pool(num_slots, R, in_features, outs, adapter_ranks, dtype, "cuda", seed)
    slots = torch.randint(0, num_slots, (T,), generator=g)
    slots = (slots.sort().values if runs else slots).cuda()
    x = torch.randn(T, in_features, generator=g).to("cuda", dtype)
    y = torch.randn(T, out_starts[-1], generator=g).to("cuda", dtype)
    return x, y, A, BT, slots, ranks, out_starts


def cpu_apply(x, y, A, BT, slots, ranks, out_starts):
    args = [t.cpu() for t in (x, y, A, BT, slots, ranks)]
    return lora_apply(*args[:2], *args[2:], out_starts).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("in_features,outs", GPU_SHAPES)
@pytest.mark.parametrize(
    "T,R,runs", [(1, 16, False), (64, 16, False), (256, 64, False), (3000, 8, False), (8192, 32, True)]
)
def test_triton_matches_the_torch_path_on_gpu(in_features, outs, T, R, runs):
    x, y, A, BT, slots, ranks, out_starts = gpu_case(T, in_features, outs, R, runs=runs)
    expected = cpu_apply(x, y, A, BT, slots, ranks, out_starts)
    with unwritten_is_nan():
        got = lora_apply(x, y.clone(), A, BT, slots, ranks, out_starts)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    h = lora_shrink(x, A, slots, ranks, len(outs))
    assert h.dtype == x.dtype
    h_cpu = lora_shrink(x.cpu(), A.cpu(), slots.cpu(), ranks.cpu(), len(outs))
    torch.testing.assert_close(h.cpu(), h_cpu, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [64, 1024])  # decode's kernels, prefill's
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_captured_cuda_graph_follows_new_slots_and_weights(T, dtype):
    x, y, A, BT, slots, ranks, out_starts = gpu_case(T, 2048, (2048, 256, 256), 16, dtype=dtype)
    y_base = y.clone()
    lora_apply(x, y.clone(), A, BT, slots, ranks, out_starts)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y.copy_(y_base)
        lora_apply(x, y, A, BT, slots, ranks, out_starts)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    for step in range(3):
        slots.copy_(torch.randint(0, A.shape[0], (T,), device="cuda"))
        x.copy_(torch.randn_like(x))
        A[1].mul_(-1.0)
        ranks[2] = step * 4
        graph.replay()
        torch.testing.assert_close(y, cpu_apply(x, y_base, A, BT, slots, ranks, out_starts), **tol)


def make_group(outs, in_features, R, device, dtype, stream=None, seed=0):
    """A LoraGroup over len(outs) linear layers, its pool filled as gpu_case fills one."""
    g = torch.Generator().manual_seed(seed)
    modules = []
    for j, out in enumerate(outs):
        linear = torch.nn.Linear(in_features, out, bias=j == 0)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(out, in_features, generator=g) / in_features**0.5)
            if linear.bias is not None:
                linear.bias.copy_(torch.randn(out, generator=g))
        modules.append((f"m{j}", linear.to(device, dtype)))
    num_slots = 8
    A, BT, ranks, _ = make_pool(num_slots, R, in_features, outs, [R, 3, 0, R, 5, R, 1], dtype, device, seed)
    with torch.no_grad():
        group = LoraGroup(modules, num_slots, ranks, stream)
    group.grow_rank(R)
    group.A.copy_(A)
    group.BT.copy_(BT)
    return group


def test_a_groups_delta_lands_in_the_residual_when_given_one():
    """The decoder hands o and down their residual: output + residual must be the same sum."""
    group = make_group((24, 8, 8), 32, 8, "cpu", torch.float32)
    x, residual = torch.randn(5, 32), torch.randn(5, 40)
    slots = torch.tensor([1, 0, 4, 3, 2])
    whole = group(x, slots)
    into = residual.clone()
    base = group(x, slots, into)
    torch.testing.assert_close(base, torch.nn.functional.linear(x, group.weight, group.bias))
    torch.testing.assert_close(base + into, whole + residual)
    assert not torch.equal(into, residual)  # rows of adapters with a rank changed


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 1024])
def test_a_group_on_its_side_stream_matches_the_cpu_path_eagerly_and_in_a_graph(T):
    """The LoRA kernels beside the base GEMM, on a stream of their own: the same sums as the CPU
    path, and a captured graph keeps both branches and their join."""
    outs, in_features = (2048, 256, 256), 2048
    gpu = make_group(outs, in_features, 16, "cuda", torch.bfloat16, torch.cuda.Stream())
    cpu = make_group(outs, in_features, 16, "cpu", torch.float32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, in_features, generator=g).cuda().bfloat16()
    slots = torch.randint(0, 8, (T,), generator=g).cuda()
    residual = torch.randn(T, sum(outs), generator=g).cuda().bfloat16()

    def expected():
        cx = x.float().cpu()
        whole = cpu(cx, slots.cpu())
        return whole, whole - torch.nn.functional.linear(cx, cpu.weight, cpu.bias)

    # Two bf16 roundings of values up to ~6 (the base output's, then the sum's), and at 1,024
    # rows the tile kernels' bf16 h.
    tol = dict(rtol=2e-2, atol=6e-2)
    whole, delta = expected()
    torch.testing.assert_close(gpu(x, slots).float().cpu(), whole, **tol)
    into = residual.clone()
    gpu(x, slots, into)
    torch.testing.assert_close((into.float() - residual.float()).cpu(), delta, **tol)

    graph = torch.cuda.CUDAGraph()
    into = torch.empty_like(residual)
    with torch.cuda.graph(graph):
        into.copy_(residual)
        out = gpu(x, slots)
        gpu(x, slots, into)
    for _ in range(2):
        x.copy_(torch.randn(T, in_features, device="cuda"))
        slots.copy_(torch.randint(0, 8, (T,), device="cuda"))
        graph.replay()
        whole, delta = expected()
        torch.testing.assert_close(out.float().cpu(), whole, **tol)
        torch.testing.assert_close((into.float() - residual.float()).cpu(), delta, **tol)
