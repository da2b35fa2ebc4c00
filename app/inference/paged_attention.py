"""Attention over a paged KV cache: the keys and values of every sequence live in fixed-size blocks
of a shared pool, found through the sequence's row of a block table.

Layout, one pair per layer: `k_cache`, `v_cache` are (num_blocks, BLOCK_SIZE, num_kv_heads,
head_dim); `block_tables[b, i]` (int32) is the physical block of row b's logical block i, so key j
of row b sits at `k_cache[block_tables[b, j // BLOCK_SIZE], j % BLOCK_SIZE]`; `lengths[b]` (int32)
counts row b's keys in the cache, its current token's included. A flat slot is
`block * BLOCK_SIZE + offset`. Block 0 is free for the caller to keep as a null block: the entries
of a block table past a row's blocks must still be valid block indices.

On CUDA, decode attention is a Triton flash-decoding kernel: stage 1 runs one program per (split
of the sequence, KV head, row) over the keys of its split only, with an online softmax, and all the
query heads of the KV head at once, so each key and value is read once; stage 2 merges the splits
by their log-sum-exp. The launch depends on shapes alone (the split count comes from the block
table's width, not from the lengths), so it can be captured in a CUDA graph; splits past a row's
length do nothing. Since the splits are sized to the table's width, pass a table cut to the blocks
the batch needs (a power-of-two bucket of its longest row, say) rather than the whole context: in
a wide table, the rows' keys fall in few splits and run on few programs.

The CPU paths (and prefill on both devices) gather the rows' blocks and run PyTorch attention with
the same semantics; what lies past a row's keys is zeroed before it meets a weight, so the caches
may hold anything there (on the CPU they are allocated uninitialised, committed as written)."""

from functools import cache

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK_SIZE = 16
# At most this many splits: a stage-2 program holds splits x head_dim fp32 values in registers.
MAX_SPLITS = 32
# Stage 1 aims at this many programs per multiprocessor, to keep enough loads in flight.
PROGRAMS_PER_SM = 4


def blocks_for(tokens: int) -> int:
    """Blocks that hold `tokens` keys."""
    return -(-tokens // BLOCK_SIZE)


def write_kv(k_cache, v_cache, k, v, slot_mapping) -> None:
    """Store k, v (tokens, num_kv_heads, head_dim) at the flat slots `slot_mapping` (tokens,)
    int64; a negative slot skips its token (padding)."""
    if k_cache.is_cuda:
        _write_kv_triton(k_cache, v_cache, k, v, slot_mapping)
        return
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache[slots // BLOCK_SIZE, slots % BLOCK_SIZE] = k[keep].to(k_cache.dtype)
    v_cache[slots // BLOCK_SIZE, slots % BLOCK_SIZE] = v[keep].to(v_cache.dtype)


def paged_decode_attention(
    q,
    k_cache,
    v_cache,
    block_tables,
    lengths,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of one query per row, q (batch, num_heads, head_dim), at position lengths[b] - 1
    over keys 0..lengths[b] - 1 (those >= lengths[b] - window with a window), logits soft-capped as
    tanh(s / softcap) * softcap when `softcap` is set. Rows of length 0 give zeros."""
    if q.is_cuda:
        return _decode_triton(q, k_cache, v_cache, block_tables, lengths, scale, window, softcap)
    return _decode_torch(q, k_cache, v_cache, block_tables, lengths, scale, window, softcap)


def paged_prefill_attention(
    q,
    k_cache,
    v_cache,
    block_tables,
    start,
    lengths,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of a chunk of queries q (batch, q_len, num_heads, head_dim), query i of row b at
    position start[b] + i, over the row's keys 0..lengths[b] - 1 (the chunk's own included): causal
    (keys j <= its position) and within the window. Reads all of block_tables' columns: pass a
    table cut to the blocks the batch needs. Queries that see no key (padding) give zeros."""
    batch, q_len, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    tables = block_tables.long()
    # (batch, kv_heads, keys, head_dim): each row's keys in order.
    k = k_cache[tables].flatten(1, 2).transpose(1, 2)
    v = v_cache[tables].flatten(1, 2).transpose(1, 2)
    keys = torch.arange(k.shape[2], device=q.device)
    # Past a row's keys the cache holds anything (another row's keys, or on the CPU memory never
    # written, NaN included), which a zero weight would not cancel.
    past = (keys >= lengths[:, None])[:, None, :, None]
    k, v = k.masked_fill(past, 0), v.masked_fill(past, 0)
    positions = start[:, None, None] + torch.arange(q_len, device=q.device)[:, None]
    visible = (keys <= positions) & (keys < lengths[:, None, None])
    if window is not None:
        visible &= keys > positions - window
    # A query that sees nothing attends everything (no NaN) and is zeroed below.
    seen = visible.any(-1, keepdim=True)
    group = heads // kv_heads
    # The query heads of a KV head share its keys: they stand in as more queries of that head
    # (SDPA's enable_gqa with a mask falls back to its math kernel).
    q = q.permute(0, 2, 1, 3).reshape(batch, kv_heads, group * q_len, dim)
    mask = (visible | ~seen)[:, None].repeat(1, 1, group, 1)
    if softcap is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
        scores = torch.tanh(scores / softcap) * softcap
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        out = torch.matmul(probs.to(v.dtype), v)
    out = out.reshape(batch, heads, q_len, dim).transpose(1, 2)
    return out.masked_fill(~seen[..., None], 0)


def _decode_torch(q, k_cache, v_cache, block_tables, lengths, scale, window, softcap):
    """The PyTorch path of paged_decode_attention: a chunk of one query at the row's last position."""
    out = paged_prefill_attention(
        q[:, None], k_cache, v_cache, block_tables, lengths - 1, lengths, scale, window, softcap
    )
    return out[:, 0]


# --- Triton ---


@cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tile(dim_pad: int) -> int:
    """Keys per stage-1 iteration: fewer for wide heads, to bound the K/V tiles' registers and shared
    memory."""
    return 64 if dim_pad <= 128 else 32


def _splits(batch: int, kv_heads: int, max_keys: int, tile: int, programs: int) -> tuple[int, int]:
    """(splits, keys per split): enough programs to fill the GPU, each over whole tiles."""
    tiles = triton.cdiv(max_keys, tile)
    splits = max(1, min(triton.cdiv(programs, batch * kv_heads), tiles, MAX_SPLITS))
    split_len = triton.cdiv(tiles, splits) * tile
    return triton.cdiv(max_keys, split_len), split_len


def _decode_triton(
    q, k_cache, v_cache, block_tables, lengths, scale, window, softcap, programs: int | None = None
):
    """The Triton path of paged_decode_attention; `programs` (default: PROGRAMS_PER_SM per
    multiprocessor) sets the split count: under the interpreter (no multiprocessors to count) and
    to tune PROGRAMS_PER_SM (bench/paged_attention.py)."""
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1 and q.stride(-1) == 1
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    dim_pad = triton.next_power_of_2(dim)
    tile = _tile(dim_pad)
    if programs is None:
        programs = PROGRAMS_PER_SM * _multiprocessors(q.device)
    splits, split_len = _splits(batch, kv_heads, block_tables.shape[1] * BLOCK_SIZE, tile, programs)
    out = torch.empty_like(q)
    mid_out = q.new_empty(batch, heads, splits, dim, dtype=torch.float32)
    mid_lse = q.new_empty(batch, heads, splits, dtype=torch.float32)
    _decode_split_kernel[(splits, kv_heads, batch)](
        q, k_cache, v_cache, block_tables, lengths, out, mid_out, mid_lse,
        scale, window or 0, softcap or 1.0, split_len,
        *q.stride()[:2], *k_cache.stride()[:3], block_tables.stride(0), *out.stride()[:2],
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), DIM=dim, DIM_PAD=dim_pad,
        PAGE=BLOCK_SIZE, TILE=tile, SPLIT=splits > 1, WINDOW=window is not None,
        SOFTCAP=softcap is not None, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=2,
    )  # fmt: skip
    if splits > 1:
        _merge_splits_kernel[(heads, batch)](
            mid_out, mid_lse, out, splits, *out.stride()[:2],
            DIM=dim, DIM_PAD=dim_pad, SPLITS_PAD=triton.next_power_of_2(splits), num_warps=4,
        )  # fmt: skip
    return out


def _write_kv_triton(k_cache, v_cache, k, v, slot_mapping) -> None:
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    tokens, heads, dim = k.shape
    _write_kv_kernel[(tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        *k.stride()[:2], *v.stride()[:2], *k_cache.stride()[:3],
        HEADS=heads, HEADS_PAD=triton.next_power_of_2(heads), DIM=dim,
        DIM_PAD=triton.next_power_of_2(dim), PAGE=BLOCK_SIZE,
    )  # fmt: skip


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_ct, stride_ch,
    HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    PAGE: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, DIM_PAD)[None, :]
    if slot >= 0:
        mask = (heads < HEADS) & (dims < DIM)
        cache = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_ct + heads * stride_ch + dims
        k = tl.load(k_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
        v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
        tl.store(k_cache_ptr + cache, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + cache, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lengths_ptr, out_ptr, mid_out_ptr, mid_lse_ptr,
    scale, window, softcap, split_len,
    stride_qb, stride_qh, stride_cb, stride_ct, stride_ch, stride_tb, stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    PAGE: tl.constexpr, TILE: tl.constexpr, SPLIT: tl.constexpr, WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    kv_head = tl.program_id(1)
    row = tl.program_id(2)
    splits = tl.num_programs(0)
    length = tl.load(lengths_ptr + row)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, length)
    if WINDOW:
        lo = tl.maximum(lo, length - window)

    rows = tl.arange(0, GROUP_PAD)  # query heads of this KV head; tl.dot needs at least 16
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, DIM_PAD)
    head_mask = rows < GROUP
    dim_mask = dims < DIM
    q = tl.load(
        q_ptr + row * stride_qb + heads[:, None] * stride_qh + dims[None, :],
        mask=head_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )
    qk_scale = scale * 1.4426950408889634  # log2(e): the softmax runs on exp2
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    for start in range(lo, hi, TILE):
        keys = start + tl.arange(0, TILE)
        valid = keys < hi
        block = tl.load(tables_ptr + row * stride_tb + keys // PAGE, mask=valid, other=0).to(tl.int64)
        offsets = block * stride_cb + (keys % PAGE) * stride_ct + kv_head * stride_ch
        kv_mask = valid[:, None] & dim_mask[None, :]
        k = tl.load(k_ptr + offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        if SOFTCAP:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (scale / softcap)
            # tanh from exp2 (exact enough in fp32, and the interpreter has no tanh)
            s = softcap * 1.4426950408889634 * (1.0 - 2.0 / (tl.exp2(s * 2.8853900817779268) + 1.0))
        else:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        # Every tile holds a visible key, so m_new is finite.
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    seen = total > 0
    result = acc / tl.where(seen, total, 1.0)[:, None]
    out_mask = head_mask[:, None] & dim_mask[None, :]
    if SPLIT:
        # Log-sum-exp in log2 units; -inf marks a split with no key of its row.
        lse = tl.where(seen, m + tl.log2(tl.where(seen, total, 1.0)), float("-inf"))
        at = (row * tl.num_programs(1) * GROUP + heads) * splits + split
        tl.store(mid_lse_ptr + at, lse, mask=head_mask)
        tl.store(mid_out_ptr + at[:, None] * DIM + dims[None, :], result, mask=out_mask & seen[:, None])
    else:
        out = out_ptr + row * stride_ob + heads[:, None] * stride_oh + dims[None, :]
        tl.store(out, result.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _merge_splits_kernel(
    mid_out_ptr, mid_lse_ptr, out_ptr, splits, stride_ob, stride_oh,
    DIM: tl.constexpr, DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(0)
    row = tl.program_id(1)
    at = (row * tl.num_programs(0) + head) * splits + tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, DIM_PAD)
    lse = tl.load(mid_lse_ptr + at, mask=tl.arange(0, SPLITS_PAD) < splits, other=float("-inf"))
    seen = lse > float("-inf")
    # The floor keeps a row with no key (all -inf) free of inf - inf.
    weight = tl.exp2(lse - tl.maximum(tl.max(lse, 0), -1e30))
    parts = tl.load(
        mid_out_ptr + at[:, None] * DIM + dims[None, :], mask=seen[:, None] & (dims < DIM)[None, :], other=0.0
    )
    total = tl.sum(weight, 0)
    result = tl.sum(parts * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(
        out_ptr + row * stride_ob + head * stride_oh + dims,
        result.to(out_ptr.dtype.element_ty),
        mask=dims < DIM,
    )
