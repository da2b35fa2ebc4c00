"""LoRA's input dropout fused into its shrink GEMM (CUDA, Triton): `dropout(x) @ A.T` without
the dropped-out copy of x.

PEFT runs `lora_A(dropout(x))` as a dropout kernel, which writes a copy of x and a mask as large as
x, then the GEMM, which reads the copy; in backward a GEMM writes the gradient, a second kernel
multiplies it by the mask, and the weight gradient reads the saved copy again. Every LoRA linear
does this in the forward, in the checkpointed recompute and in backward, on inputs of up to
tokens x intermediate size: on the TinyLlama-1.1B shape at batch 128 it was 9 % of the step's GPU
time and 462 of its kernels, and the step ran 20 % faster with `lora_dropout` 0
(bench/profile_train.py, H200). Here the mask is never stored: each kernel computes it again from
a hash of one seed per call and the element's index, so the forward reads x once and nothing of
x's size is saved beyond x itself (which the base layer keeps anyway). Backward is two kernels:
the input gradient with the mask applied as it is written, and the weight gradient reading x
through the mask, split over the tokens into partial sums that are added up in a fixed order
(deterministic). The seed comes from torch's CPU generator, whose state activation checkpointing
restores for the recompute, so the recompute draws the mask the forward used.

The same dropout as PEFT's in distribution (each element kept with probability 1 - p, scaled by
1 / (1 - p), independently per element, layer and call), not the same draws as torch's generator."""

import torch
import triton
import triton.language as tl

# Rows of x per program (forward, input gradient) and per partial sum of the weight gradient.
BLOCK_M = 64
BLOCK_K = 64
ROWS_PER_SPLIT = 512
# Element indices key the mask and are int32 in the kernels.
MAX_ELEMENTS = 2**31 - 1


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """x: the layer's input; weight: lora_A's (rank x K)."""
    return (
        x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and 0 < x.numel()
        and x.numel() + BLOCK_M * x.shape[-1] <= MAX_ELEMENTS
        and weight.shape[0] <= 128
    )


def _rank_block(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def keep_threshold(p: float) -> tuple[int, float]:
    """(threshold, scale): an element is kept when its 32 random bits are >= threshold, and kept
    elements are scaled so that the expectation is x's (1 / (1 - p), to p's rounding to 2^-32)."""
    threshold = min(round(p * 2**32), 2**32 - 1)
    return threshold, 2**32 / (2**32 - threshold)


@triton.jit
def _kept(seed, index, threshold):
    """Whether dropout keeps the elements at these flat indices: 32 random bits per element from an
    integer hash of (index, seed) (lowbias32, nine integer operations). A Philox draw per element
    (`tl.rand`) made the kernels compute-bound on the generator, and unpacking one draw over
    several elements cost a shuffle of the tile."""
    bits = index.to(tl.uint32) ^ seed.to(tl.uint32)
    bits ^= bits >> 16
    bits *= 0x7FEB352D
    bits ^= bits >> 15
    bits *= 0x846CA68B
    bits ^= bits >> 16
    return bits >= threshold.to(tl.uint32)


@triton.jit(do_not_specialize=["M", "seed"])
def _shrink_kernel(
    x, a, h, M, K, rank, seed, threshold, scale, R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr
):
    """h[rows] = (x[rows] * kept * scale) @ a.T, one block of rows per program."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    ranks = tl.arange(0, R)
    acc = tl.zeros((BM, R), dtype=tl.float32)
    for start in range(0, K, BK):
        cols = start + tl.arange(0, BK)
        index = rows[:, None] * K + cols[None, :]
        tile = tl.load(x + index, mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)
        tile = tl.where(_kept(seed, index, threshold), tile, 0.0).to(x.dtype.element_ty)
        in_a = (ranks[None, :] < rank) & (cols[:, None] < K)
        weight = tl.load(a + ranks[None, :] * K + cols[:, None], mask=in_a, other=0.0)
        acc += tl.dot(tile, weight.to(x.dtype.element_ty))
    in_h = (rows[:, None] < M) & (ranks[None, :] < rank)
    tl.store(h + rows[:, None] * rank + ranks[None, :], (acc * scale).to(h.dtype.element_ty), mask=in_h)


@triton.jit(do_not_specialize=["M", "seed"])
def _input_grad_kernel(
    g, a, dx, M, K, rank, seed, threshold, scale, R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr
):
    """dx = (g @ a) * kept * scale, one (rows, cols) tile per program."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    ranks = tl.arange(0, R)
    in_g = (rows[:, None] < M) & (ranks[None, :] < rank)
    grad = tl.load(g + rows[:, None] * rank + ranks[None, :], mask=in_g, other=0.0)
    in_a = (ranks[:, None] < rank) & (cols[None, :] < K)
    weight = tl.load(a + ranks[:, None] * K + cols[None, :], mask=in_a, other=0.0)
    acc = tl.dot(grad, weight.to(g.dtype.element_ty))
    index = rows[:, None] * K + cols[None, :]
    acc = tl.where(_kept(seed, index, threshold), acc * scale, 0.0)
    tl.store(dx + index, acc.to(dx.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < K))


@triton.jit(do_not_specialize=["M", "seed"])
def _weight_grad_kernel(
    g,
    x,
    partial,
    M,
    K,
    rank,
    seed,
    threshold,
    R: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """partial[split] = g[rows].T @ (x[rows] * kept) over the split's SPLIT rows, per block of cols."""
    cols = tl.program_id(0) * BK + tl.arange(0, BK)
    split = tl.program_id(1)
    ranks = tl.arange(0, R)
    acc = tl.zeros((R, BK), dtype=tl.float32)
    for start in range(split * SPLIT, split * SPLIT + SPLIT, BM):
        rows = start + tl.arange(0, BM)
        in_g = (rows[None, :] < M) & (ranks[:, None] < rank)
        grad = tl.load(g + rows[None, :] * rank + ranks[:, None], mask=in_g, other=0.0)
        index = rows[:, None] * K + cols[None, :]
        tile = tl.load(x + index, mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)
        tile = tl.where(_kept(seed, index, threshold), tile, 0.0).to(x.dtype.element_ty)
        acc += tl.dot(grad.to(x.dtype.element_ty), tile)
    in_part = (ranks[:, None] < rank) & (cols[None, :] < K)
    tl.store(partial + split * rank * K + ranks[:, None] * K + cols[None, :], acc, mask=in_part)


class _DropoutShrink(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, p, seed):
        rows = x.reshape(-1, x.shape[-1])
        M, K = rows.shape
        rank = weight.shape[0]
        h = torch.empty(M, rank, device=x.device, dtype=x.dtype)
        threshold, scale = keep_threshold(p)
        args = (rows, weight, h, M, K, rank, seed, threshold, scale)
        _shrink_kernel[(triton.cdiv(M, BLOCK_M),)](*args, R=_rank_block(rank), BM=BLOCK_M, BK=BLOCK_K)
        ctx.save_for_backward(rows, weight)
        ctx.threshold, ctx.seed, ctx.scale, ctx.shape = threshold, seed, scale, x.shape
        return h.view(*x.shape[:-1], rank)

    @staticmethod
    def backward(ctx, grad_h):
        rows, weight = ctx.saved_tensors
        M, K = rows.shape
        rank = weight.shape[0]
        grad_h = grad_h.reshape(M, rank).to(rows.dtype).contiguous()
        block = _rank_block(rank)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(rows)
            grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(K, BLOCK_K))
            args = (grad_h, weight, grad_x, M, K, rank, ctx.seed, ctx.threshold, ctx.scale)
            _input_grad_kernel[grid](*args, R=block, BM=BLOCK_M, BK=BLOCK_K)
            grad_x = grad_x.view(ctx.shape)
        if ctx.needs_input_grad[1]:
            splits = triton.cdiv(M, ROWS_PER_SPLIT)
            partial = torch.empty(splits, rank, K, device=rows.device, dtype=torch.float32)
            _weight_grad_kernel[(triton.cdiv(K, BLOCK_K), splits)](
                grad_h,
                rows,
                partial,
                M,
                K,
                rank,
                ctx.seed,
                ctx.threshold,
                R=block,
                BM=BLOCK_M,
                BK=BLOCK_K,
                SPLIT=ROWS_PER_SPLIT,
            )
            grad_weight = (partial.sum(0) * ctx.scale).to(weight.dtype)
        return grad_x, grad_weight, None, None


def dropout_shrink(x: torch.Tensor, weight: torch.Tensor, p: float, seed: int | None = None) -> torch.Tensor:
    """`F.dropout(x, p) @ weight.T` in training (x: (..., K) bf16/fp16 on CUDA, contiguous; weight:
    (rank, K), any float dtype; the result has x's dtype). `seed` keys the mask; by default one is
    drawn from torch's CPU generator."""
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()))
    return _DropoutShrink.apply(x.contiguous(), weight.contiguous(), float(p), seed)
