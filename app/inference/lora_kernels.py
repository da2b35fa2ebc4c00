"""Per-token LoRA over a stacked adapter pool (punica / S-LoRA BGMV): each token row multiplies only
its own slot's A and B, so the cost follows the rows and their adapters' ranks, not how many
slots are resident.

One pool per group of n projections that share an input (q/k/v, gate/up, o, down):
  A  (num_slots, n * R, in)   projection j's A in rows [j*R, (j+1)*R), scale folded in
  BT (num_slots, R, out_total) projection j's B^T in columns [out_starts[j], out_starts[j+1])
R is the pool rank; an adapter of rank r < R leaves rows r.. of each segment zero, and
`ranks[slot]` = r lets the kernels skip them. Slot 0 is the base model (no LoRA): its rows are
skipped, as are rows of any slot whose rank is 0.

CUDA tensors run Triton kernels that are CUDA-graph capturable (shapes and launch grids depend
only on tensor shapes, never on values: no host sync). CPU tensors take a PyTorch path with the
same semantics, grouped by the slots present. `lora_apply(x, y, ...)` adds the delta to the base
output y in place; its shrink output stays fp32 between the two kernels (the prefill expand
rounds it to the pool's dtype for its tensor-core dot): at decode, one plane of partial sums per
split of the in-dimension, which the expand adds up, so nothing is zeroed first and no atomics
are needed; at prefill, one plane that the splits add into atomically.

Two kernel shapes, picked by the number of rows (a shape, so a captured graph keeps its pick):
- up to TILE_MIN_TOKENS rows (decode), BGMV: one program per row (and rank block, and split of
  the in-dimension for shrink / block of output columns for expand), each reading its row's own
  A and B once: the step is memory-bound and spread over the whole GPU however few rows it has.
- more rows (prefill), SGMV-style: one program per tile of consecutive rows, which multiplies the
  tile by each distinct slot among its rows in turn with tl.dot, so a slot's A and B are read
  once per tile instead of once per row. Prefill rows come in runs of one sequence (one slot),
  so most tiles hold one slot; rows need not be sorted by slot, a mixed tile just takes one
  pass per slot."""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install (the CPU torch wheel brings no Triton) has the torch path
    triton = None

MAX_SEGMENTS = 3  # the expand kernel takes the segment boundaries as two scalar arguments
# Decode (BGMV) launch shapes, the best of a sweep on the H200 (TinyLlama and Mistral-7B shapes,
# 1-64 rows over as many adapters; docs/BENCHMARKS.md). Shrink splits the in-dimension until about
# SHRINK_TARGET_PROGRAMS programs run, so a step of a few rows still spreads its A reads over every
# SM, each split's sums in a plane of their own; at most SHRINK_MAX_SPLITS planes, since the
# expand reads them all.
SHRINK_TARGET_PROGRAMS = 1024
SHRINK_MAX_SPLITS = 32
SHRINK_BLOCK_K = 64
# Expand's output columns per program: wide, so that each thread has many loads in flight (a
# 1.1B-shape step of 64 rows: 287 us against 1,242 at 256 columns).
EXPAND_BLOCK_N = 1024
EXPAND_WARPS = 4
SHRINK_WARPS = 4
TILE_MIN_TOKENS = 512
TILE_T = 64
TILE_K = 64  # shrink tiles: in-dimension block
TILE_N = 128  # expand tiles: output columns block
# Block sizes and warps with which no bf16 kernel spills registers on sm_90 (Triton 3.9 compiler, R 8-64).
TILE_WARPS = 8


def lora_shrink(
    x: torch.Tensor, A: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor, segments: int
) -> torch.Tensor:
    """h[t] = x[t] @ A[slots[t]].T, (T, n * R) in x's dtype (accumulated in fp32), zero past each
    row's rank and on base rows. `segments` is n, the number of projections stacked in A (needed
    to know where each one's rank ends)."""
    return _shrink(x, A, slots, ranks, segments, zeroed=True).sum(0).to(x.dtype)


def lora_expand(
    h: torch.Tensor,
    BT: torch.Tensor,
    slots: torch.Tensor,
    ranks: torch.Tensor,
    out_starts: tuple[int, ...],
    y: torch.Tensor,
) -> torch.Tensor:
    """y[t, c] += h[t, j*R : (j+1)*R] @ BT[slots[t], :, c] for c in segment j, in place (fp32
    accumulation, one rounding to y's dtype). Returns y."""
    return _expand(h.unsqueeze(0), BT, slots, ranks, out_starts, y)


def lora_apply(
    x: torch.Tensor,
    y: torch.Tensor,
    A: torch.Tensor,
    BT: torch.Tensor,
    slots: torch.Tensor,
    ranks: torch.Tensor,
    out_starts: tuple[int, ...],
) -> torch.Tensor:
    """y += the LoRA delta of x (shrink then expand), in place. Returns y."""
    return lora_add(
        lora_partial_sums(x, A, slots, ranks, len(out_starts) - 1), BT, slots, ranks, out_starts, y
    )


def lora_partial_sums(x, A, slots, ranks, segments: int) -> torch.Tensor:
    """lora_apply's first half: the shrink as planes of partial sums (splits, T, n * R) fp32, as
    `lora_add` takes them, entries no one reads left unwritten."""
    return _shrink(x, A, slots, ranks, segments, zeroed=False)


def lora_add(parts, BT, slots, ranks, out_starts: tuple[int, ...], y: torch.Tensor) -> torch.Tensor:
    """lora_apply's second half: y += the expand of `lora_partial_sums`' planes, in place. y has
    the rows of x and the group's output columns: the group's output, or a tensor it will be
    added to. Returns y."""
    return _expand(parts, BT, slots, ranks, out_starts, y)


def _shrink(x, A, slots, ranks, segments, zeroed: bool) -> torch.Tensor:
    """The shrink as partial sums over splits of the in-dimension, (splits, T, n * R) fp32."""
    _check_shrink(x, A, slots, ranks, segments)
    if x.is_cuda:
        return _triton_shrink(x, A, slots, ranks, segments, zeroed=zeroed)
    return torch_shrink(x, A, slots, ranks, segments, torch.float32).unsqueeze(0)


def _expand(parts, BT, slots, ranks, out_starts, y):
    _check_expand(parts[0], BT, slots, ranks, out_starts, y)
    if y.is_cuda:
        _triton_expand(parts, BT, slots, ranks, out_starts, y)
    else:
        torch_expand(_summed(parts), BT, slots, ranks, out_starts, y)
    return y


def _summed(parts: torch.Tensor) -> torch.Tensor:
    """h from its planes of partial sums (no copy when there is one plane, as on the CPU path)."""
    return parts.sum(0) if parts.shape[0] > 1 else parts[0]


def _check_shrink(x, A, slots, ranks, segments):
    T, in_features = x.shape
    if A.dim() != 3 or A.shape[2] != in_features or A.shape[1] % segments:
        raise ValueError(f"A {tuple(A.shape)} does not fit x {tuple(x.shape)} with {segments} segments")
    if slots.shape != (T,) or ranks.shape != (A.shape[0],):
        raise ValueError(f"slots {tuple(slots.shape)} / ranks {tuple(ranks.shape)} do not fit")
    if not 1 <= segments <= MAX_SEGMENTS:
        raise ValueError(f"{segments} segments: at most {MAX_SEGMENTS}")


def _check_expand(h, BT, slots, ranks, out_starts, y):
    segments, R = len(out_starts) - 1, BT.shape[1]
    if not 1 <= segments <= MAX_SEGMENTS:
        raise ValueError(f"{segments} segments: at most {MAX_SEGMENTS}")
    if out_starts[0] != 0 or out_starts[-1] != BT.shape[2] or list(out_starts) != sorted(out_starts):
        raise ValueError(f"out_starts {out_starts} do not split {BT.shape[2]} columns")
    if h.shape != (y.shape[0], segments * R) or y.shape[1] != BT.shape[2]:
        raise ValueError(f"h {tuple(h.shape)}, y {tuple(y.shape)} do not fit BT {tuple(BT.shape)}")
    if slots.shape != (y.shape[0],) or ranks.shape != (BT.shape[0],):
        raise ValueError(f"slots {tuple(slots.shape)} / ranks {tuple(ranks.shape)} do not fit")
    if y.stride(1) != 1:
        raise ValueError("y must be contiguous along its last dimension (it is written in place)")


# --- PyTorch path (CPU) -------------------------------------------------------------------------


def _slot_rows(slots: torch.Tensor, ranks: torch.Tensor, R: int):
    """(slot, its rows, its rank) for each LoRA slot present in `slots`."""
    rank_of = ranks.tolist()
    for slot in torch.unique(slots).tolist():
        rank = min(rank_of[slot], R)
        if slot != 0 and rank > 0:
            yield slot, (slots == slot).nonzero().squeeze(1), rank


def torch_shrink(x, A, slots, ranks, segments: int, h_dtype: torch.dtype | None = None) -> torch.Tensor:
    T, in_features = x.shape
    R = A.shape[1] // segments
    h = x.new_zeros(T, segments, R, dtype=h_dtype or x.dtype)
    for slot, rows, rank in _slot_rows(slots, ranks, R):
        a = A[slot].view(segments, R, in_features)[:, :rank].reshape(segments * rank, in_features)
        part = x[rows].float() @ a.float().T
        h[rows, :, :rank] = part.view(-1, segments, rank).to(h.dtype)
    return h.view(T, segments * R)


def torch_expand(h, BT, slots, ranks, out_starts: tuple[int, ...], y: torch.Tensor) -> torch.Tensor:
    segments, R = len(out_starts) - 1, BT.shape[1]
    for slot, rows, rank in _slot_rows(slots, ranks, R):
        hs = h[rows].float().view(-1, segments, R)[:, :, :rank]
        bt = BT[slot, :rank].float()
        delta = torch.cat(
            [hs[:, j] @ bt[:, out_starts[j] : out_starts[j + 1]] for j in range(segments)], dim=1
        )
        y[rows] = (y[rows].float() + delta).to(y.dtype)
    return y


# --- Triton path (CUDA; also CPU tensors under TRITON_INTERPRET=1) ------------------------------


def _rank_block(R: int) -> int:
    # Rank is walked in blocks of 16 (8 for an R=8 pool) so that a rank-16 adapter in an R=64
    # pool reads and multiplies 16 rows, not 64.
    return min(16, triton.next_power_of_2(R))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 pools stay fp32 (no TF32 rounding)


def _triton_shrink(
    x, A, slots, ranks, segments: int, tiles: bool | None = None, zeroed: bool = False
) -> torch.Tensor:
    """(splits, T, n * R) fp32 partial sums. Decode programs store their split's sums in a plane
    of their own, so nothing needs zeroing first (`zeroed` asks for zeros where no row is
    written: base rows, ranks past a row's own); tiles hold one plane, added by atomics."""
    T, in_features = x.shape
    R = A.shape[1] // segments
    x, A, slots = x.contiguous(), A.contiguous(), slots.contiguous()
    tiles = T >= TILE_MIN_TOKENS if tiles is None else tiles
    # Tiles hold the whole rank (a dot needs 16 rows at least); BGMV walks it in rank blocks.
    block_r = max(16, triton.next_power_of_2(R)) if tiles else _rank_block(R)
    block_k = TILE_K if tiles else SHRINK_BLOCK_K
    row_programs = triton.cdiv(T, TILE_T) if tiles else T
    blocks_k = triton.cdiv(in_features, block_k)
    splits = min(blocks_k, max(1, triton.cdiv(SHRINK_TARGET_PROGRAMS, row_programs * segments)))
    if not tiles:
        splits = min(splits, SHRINK_MAX_SPLITS)
    k_per_split = triton.cdiv(blocks_k, splits) * block_k
    splits = triton.cdiv(in_features, k_per_split)
    atomic = tiles and splits > 1
    planes = 1 if tiles else splits
    alloc = torch.zeros if zeroed or atomic else torch.empty
    h = alloc(planes, T, segments * R, dtype=torch.float32, device=x.device)
    if T == 0:
        return h
    grid = (row_programs, segments * triton.cdiv(R, block_r), splits)
    args = (x, A, h, slots, ranks, in_features, k_per_split)
    strides = (x.stride(0), A.stride(0), A.stride(1), h.stride(1))
    blocks = dict(R=R, BLOCK_R=block_r, BLOCK_K=block_k)
    if tiles:
        precision = _dot_precision(x.dtype)
        _shrink_tiles_kernel[grid](
            *args, *strides, T, BLOCK_T=TILE_T, DOT_PRECISION=precision, ATOMIC=atomic,
            num_warps=TILE_WARPS, **blocks,
        )  # fmt: skip
    else:
        _shrink_kernel[grid](*args, *strides, h.stride(0), num_warps=SHRINK_WARPS, **blocks)
    return h


def _triton_expand(
    parts, BT, slots, ranks, out_starts: tuple[int, ...], y: torch.Tensor, tiles: bool | None = None
) -> None:
    """y += the sum over the planes of `parts` (splits, T, n * R), expanded."""
    T, out_total = y.shape
    R = BT.shape[1]
    BT, slots = BT.contiguous(), slots.contiguous()
    bounds = list(out_starts[1:-1]) + [out_total] * (MAX_SEGMENTS - len(out_starts) + 1)
    if T == 0:
        return
    # Column blocks never straddle two projections, so each block multiplies one segment of h.
    edges = [0, bounds[0], bounds[1], out_total]
    if not (T >= TILE_MIN_TOKENS if tiles is None else tiles):
        blocks = [triton.cdiv(edges[j + 1] - edges[j], EXPAND_BLOCK_N) for j in range(MAX_SEGMENTS)]
        grid = (T, sum(blocks))
        _expand_kernel[grid](
            parts, BT, y, slots, ranks, out_total, bounds[0], bounds[1], blocks[0], blocks[0] + blocks[1],
            parts.shape[0], parts.stride(0), parts.stride(1), BT.stride(0), BT.stride(1), y.stride(0),
            R=R, BLOCK_R=_rank_block(R), BLOCK_N=EXPAND_BLOCK_N,
            BLOCK_S=triton.next_power_of_2(parts.shape[0]), num_warps=EXPAND_WARPS,
        )  # fmt: skip
        return
    h = _summed(parts)
    blocks = [triton.cdiv(edges[j + 1] - edges[j], TILE_N) for j in range(MAX_SEGMENTS)]
    grid = (triton.cdiv(T, TILE_T), sum(blocks))
    _expand_tiles_kernel[grid](
        h, BT, y, slots, ranks, out_total, bounds[0], bounds[1], blocks[0], blocks[0] + blocks[1], T,
        h.stride(0), BT.stride(0), BT.stride(1), y.stride(0),
        R=R, BLOCK_T=TILE_T, BLOCK_R=max(16, _rank_block(R)), BLOCK_N=TILE_N,
        DOT_PRECISION=_dot_precision(BT.dtype), num_warps=TILE_WARPS,
    )  # fmt: skip


if triton is not None:
    NO_SLOT = tl.constexpr(2**31 - 1)  # above any slot: the pick of a tile's next slot when none is left

    @triton.jit
    def _shrink_kernel(
        x_ptr, a_ptr, h_ptr, slots_ptr, ranks_ptr, in_features, k_per_split,
        x_stride, a_slot_stride, a_row_stride, h_stride, h_split_stride,
        R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # Program (token, segment * rank block, split of the in-dimension): its split's plane.
        t = tl.program_id(0).to(tl.int64)
        segment = tl.program_id(1) // ((R + BLOCK_R - 1) // BLOCK_R)
        r0 = (tl.program_id(1) % ((R + BLOCK_R - 1) // BLOCK_R)) * BLOCK_R
        slot = tl.load(slots_ptr + t).to(tl.int64)
        rank = tl.minimum(tl.load(ranks_ptr + slot), R)
        if (slot != 0) & (r0 < rank):
            rows = r0 + tl.arange(0, BLOCK_R)
            row_ok = rows < rank
            a_rows = a_ptr + slot * a_slot_stride + (segment * R + rows)[:, None] * a_row_stride
            x_row = x_ptr + t * x_stride
            k_start = tl.program_id(2) * k_per_split
            acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
            for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                col_ok = cols < in_features
                xv = tl.load(x_row + cols, mask=col_ok, other=0.0).to(tl.float32)
                av = tl.load(a_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
                acc += av.to(tl.float32) * xv[None, :]
            dst = h_ptr + tl.program_id(2).to(tl.int64) * h_split_stride + t * h_stride + segment * R + rows
            tl.store(dst, tl.sum(acc, axis=1), mask=row_ok)

    @triton.jit
    def _block_columns(block, bound1, bound2, out_total, blocks1, blocks2, BLOCK_N: tl.constexpr):
        """A column block's projection (segment), its columns and which of them exist."""
        segment = (block >= blocks1).to(tl.int32) + (block >= blocks2).to(tl.int32)
        start = tl.where(segment == 0, 0, tl.where(segment == 1, bound1, bound2))
        end = tl.where(segment == 0, bound1, tl.where(segment == 1, bound2, out_total))
        first_block = tl.where(segment == 0, 0, tl.where(segment == 1, blocks1, blocks2))
        cols = start + (block - first_block) * BLOCK_N + tl.arange(0, BLOCK_N)
        return segment, cols, cols < end

    @triton.jit
    def _expand_kernel(
        h_ptr, bt_ptr, y_ptr, slots_ptr, ranks_ptr, out_total, bound1, bound2, blocks1, blocks2,
        splits, h_split_stride, h_stride, bt_slot_stride, bt_row_stride, y_stride,
        R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        # Program (token, block of one projection's output columns); each output element has
        # exactly one writer. The block's h is one vector of the row's rank, the sum of the
        # shrink's planes, read in one load.
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slots_ptr + t).to(tl.int64)
        rank = tl.minimum(tl.load(ranks_ptr + slot), R)
        if (slot != 0) & (rank > 0):
            segment, cols, col_ok = _block_columns(
                tl.program_id(1), bound1, bound2, out_total, blocks1, blocks2, BLOCK_N
            )
            planes = tl.arange(0, BLOCK_S)
            h_row = h_ptr + planes[:, None] * h_split_stride + t * h_stride + segment * R
            bt_slot = bt_ptr + slot * bt_slot_stride
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for r0 in range(0, rank, BLOCK_R):
                rows = r0 + tl.arange(0, BLOCK_R)
                r_ok = rows < rank
                bv = tl.load(
                    bt_slot + rows[:, None] * bt_row_stride + cols[None, :],
                    mask=r_ok[:, None] & col_ok[None, :],
                    other=0.0,
                )
                h_ok = (planes < splits)[:, None] & r_ok[None, :]
                hv = tl.sum(tl.load(h_row + rows[None, :], mask=h_ok, other=0.0), axis=0)
                acc += tl.sum(hv[:, None] * bv.to(tl.float32), axis=0)
            dst = y_ptr + t * y_stride + cols
            yv = tl.load(dst, mask=col_ok, other=0.0)
            tl.store(dst, (yv.to(tl.float32) + acc).to(yv.dtype), mask=col_ok)

    @triton.jit
    def _shrink_tiles_kernel(
        x_ptr, a_ptr, h_ptr, slots_ptr, ranks_ptr, in_features, k_per_split,
        x_stride, a_slot_stride, a_row_stride, h_stride, T,
        R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr,
        BLOCK_T: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        # Program (tile of rows, segment, split of the in-dimension); BLOCK_R covers the rank.
        tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        token_slots = tl.load(slots_ptr + tokens, mask=tokens < T, other=0).to(tl.int32)
        token_ranks = tl.minimum(tl.load(ranks_ptr + token_slots), R)
        pending = (tokens < T) & (token_slots != 0) & (token_ranks > 0)
        segment = tl.program_id(1)
        rows = tl.arange(0, BLOCK_R)
        x_rows = x_ptr + tokens.to(tl.int64)[:, None] * x_stride
        h_dst = h_ptr + tokens.to(tl.int64)[:, None] * h_stride + segment * R + rows[None, :]
        k_start = tl.program_id(2) * k_per_split
        slot = tl.min(tl.where(pending, token_slots, NO_SLOT), axis=0)
        while slot != NO_SLOT:
            chosen = pending & (token_slots == slot)
            row_ok = rows < tl.minimum(tl.load(ranks_ptr + slot), R)
            # A^T tile: (in block, rank) of this slot's segment.
            a_cols = a_ptr + slot.to(tl.int64) * a_slot_stride + (segment * R + rows)[None, :] * a_row_stride
            acc = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
            for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                col_ok = cols < in_features
                xv = tl.load(x_rows + cols[None, :], mask=chosen[:, None] & col_ok[None, :], other=0.0)
                av = tl.load(a_cols + cols[:, None], mask=col_ok[:, None] & row_ok[None, :], other=0.0)
                acc = tl.dot(xv, av.to(xv.dtype), acc, input_precision=DOT_PRECISION)
            done = chosen[:, None] & row_ok[None, :]
            if ATOMIC:
                tl.atomic_add(h_dst, acc, mask=done)
            else:
                tl.store(h_dst, acc.to(h_ptr.dtype.element_ty), mask=done)
            pending = pending & (token_slots != slot)
            slot = tl.min(tl.where(pending, token_slots, NO_SLOT), axis=0)

    @triton.jit
    def _expand_tiles_kernel(
        h_ptr, bt_ptr, y_ptr, slots_ptr, ranks_ptr, out_total, bound1, bound2, blocks1, blocks2, T,
        h_stride, bt_slot_stride, bt_row_stride, y_stride,
        R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        # Program (tile of rows, block of one projection's output columns).
        tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        token_slots = tl.load(slots_ptr + tokens, mask=tokens < T, other=0).to(tl.int32)
        token_ranks = tl.minimum(tl.load(ranks_ptr + token_slots), R)
        pending = (tokens < T) & (token_slots != 0) & (token_ranks > 0)
        lora_rows = pending
        segment, cols, col_ok = _block_columns(
            tl.program_id(1), bound1, bound2, out_total, blocks1, blocks2, BLOCK_N
        )
        h_rows = h_ptr + tokens.to(tl.int64)[:, None] * h_stride + segment * R
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        slot = tl.min(tl.where(pending, token_slots, NO_SLOT), axis=0)
        while slot != NO_SLOT:
            chosen = pending & (token_slots == slot)
            rank = tl.minimum(tl.load(ranks_ptr + slot), R)
            bt_slot = bt_ptr + slot.to(tl.int64) * bt_slot_stride
            for r0 in range(0, rank, BLOCK_R):
                rows = r0 + tl.arange(0, BLOCK_R)
                r_ok = rows < rank
                hv = tl.load(h_rows + rows[None, :], mask=chosen[:, None] & r_ok[None, :], other=0.0)
                bv = tl.load(
                    bt_slot + rows[:, None] * bt_row_stride + cols[None, :],
                    mask=r_ok[:, None] & col_ok[None, :],
                    other=0.0,
                )
                acc = tl.dot(hv.to(bv.dtype), bv, acc, input_precision=DOT_PRECISION)
            pending = pending & (token_slots != slot)
            slot = tl.min(tl.where(pending, token_slots, NO_SLOT), axis=0)
        dst = y_ptr + tokens.to(tl.int64)[:, None] * y_stride + cols[None, :]
        ok = lora_rows[:, None] & col_ok[None, :]
        yv = tl.load(dst, mask=ok, other=0.0)
        tl.store(dst, (yv.to(tl.float32) + acc).to(yv.dtype), mask=ok)
