"""Mixed-adapter LoRA over a stacked adapter pool (the punica / S-LoRA layout).

Every linear layer inside the decoder layers is wrapped: it holds A and B for all GPU slots,
stacked as A (slots, rank, in) and B^T (slots, rank, out), with each adapter's scale folded into
its A. A batch row's delta is computed against every slot at once and masked to the row's own
slot: x @ A_all^T gives (tokens, slots * rank), a per-row 0/1 mask keeps the row's slot, and that
times B^T_all is the delta. With a handful of slots and rank 16 both products are tiny (the pool holds
well under a megabyte per layer), nothing is gathered per step, the shapes never depend on which
adapters are in the batch (so a decode step can be captured once as a CUDA graph and replayed),
and a row of slot 0 (the base model) gets an exact zero delta. Adapters of smaller rank are
zero-padded up to the pool's rank, which grows (for every layer together) when needed."""

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Weights = Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]  # name -> (A, B, scale)


class RowSlots:
    """Which pool slot each batch row uses in the next forward pass (set by the engine), as the
    (rows, slots * rank) 0/1 mask that every wrapped layer reads. The mask lives in one buffer
    that is written in place, so captured graphs keep reading the current rows."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device = device
        self.dtype = dtype
        self.num_slots = 1
        self.rank = 0
        self.mask = torch.zeros(1, 0, dtype=dtype, device=device)
        self.slots: tuple[int, ...] = (0,)
        self.version = 0  # bumped whenever `mask` is reallocated

    def resize(self, num_slots: int, rank: int, rows: int) -> None:
        rows = max(rows, self.mask.shape[0])
        self.num_slots, self.rank = num_slots, rank
        self.mask = torch.zeros(rows, num_slots * rank, dtype=self.dtype, device=self.device)
        self.version += 1
        self.set(list(self.slots))

    def set(self, slots: list[int]) -> None:
        self.slots = tuple(slots)
        if len(slots) > self.mask.shape[0]:
            self.resize(self.num_slots, self.rank, len(slots))
            return
        if self.rank == 0:
            return
        onehot = torch.zeros(len(slots), self.num_slots, self.rank, dtype=self.dtype)
        onehot[torch.arange(len(slots)), torch.tensor(slots, dtype=torch.long)] = 1
        self.mask[: len(slots)].copy_(onehot.view(len(slots), -1), non_blocking=True)


class PooledLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, num_slots: int, rows: RowSlots):
        super().__init__()
        self.base = base
        self.rows = rows
        self.num_slots = num_slots
        self.rank = 0
        weight = base.weight
        self.register_buffer("lora_A", weight.new_zeros(num_slots, 0, base.in_features), persistent=False)
        self.register_buffer("lora_BT", weight.new_zeros(num_slots, 0, base.out_features), persistent=False)

    def grow_rank(self, rank: int) -> None:
        if rank <= self.rank:
            return
        grown_A = self.lora_A.new_zeros(self.num_slots, rank, self.base.in_features)
        grown_BT = self.lora_BT.new_zeros(self.num_slots, rank, self.base.out_features)
        grown_A[:, : self.rank] = self.lora_A
        grown_BT[:, : self.rank] = self.lora_BT
        self.lora_A, self.lora_BT, self.rank = grown_A, grown_BT, rank

    def clear(self, slot: int) -> None:
        self.lora_A[slot].zero_()
        self.lora_BT[slot].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.rank == 0:
            return y
        # x: (batch, tokens, in) -> (batch, tokens, slots * rank), masked to each row's slot.
        hidden = F.linear(x, self.lora_A.view(-1, self.base.in_features))
        mask = self.rows.mask[: x.shape[0]]
        hidden = hidden * (mask.unsqueeze(1) if x.dim() == 3 else mask)
        return y + torch.matmul(hidden, self.lora_BT.view(-1, self.base.out_features))


class AdapterPool:
    """The GPU tier: `num_slots` adapters resident in the wrapped model at once (slot 0 = none).
    `version` changes whenever buffers are reallocated (captured graphs must then be redone)."""

    def __init__(self, model: nn.Module, num_slots: int, device: torch.device, rank: int = 0):
        dtype = next(model.parameters()).dtype
        self.rows = RowSlots(device, dtype)
        self.layers: dict[str, PooledLoraLinear] = {}
        self.num_slots = num_slots + 1
        self.rank = 0
        targets = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and ".layers." in name
        ]
        for name, module in targets:
            parent_name, _, attr = name.rpartition(".")
            wrapped = PooledLoraLinear(module, self.num_slots, self.rows)
            setattr(model.get_submodule(parent_name), attr, wrapped)
            self.layers[name] = wrapped
        self.grow_rank(rank)

    def grow_rank(self, rank: int) -> None:
        if rank <= self.rank:
            return
        for layer in self.layers.values():
            layer.grow_rank(rank)
        self.rank = rank
        self.rows.resize(self.num_slots, rank, 1)

    @property
    def version(self) -> int:
        return self.rows.version

    def write(self, slot: int, adapter: "StagedAdapter | Weights") -> None:
        """Put one adapter into `slot`; other slots are untouched. A StagedAdapter in pinned host
        memory goes over in one asynchronous copy; on the device the B matrices are transposed
        in one batch per shape and everything lands in the slot in one batched copy, then the
        A matrices are scaled in place (a handful of kernels in all)."""
        if not isinstance(adapter, StagedAdapter):
            adapter = stage_weights(adapter, self.rows.dtype)
        self.grow_rank(adapter.rank)
        flat = adapter.flat.to(self.rows.device, non_blocking=True)
        a_targets, a_sources, scales, zero = [], [], [], []
        b_by_shape = defaultdict(list)  # (out, rank) -> [(target, B as stored)]
        for name, layer in self.layers.items():
            part = adapter.parts.get(name)
            if part is None:
                zero += [layer.lora_A[slot], layer.lora_BT[slot]]
                continue
            in_features, out_features = layer.base.in_features, layer.base.out_features
            a_targets.append(layer.lora_A[slot, : part.rank])
            a_sources.append(
                flat[part.a_at : part.a_at + part.rank * in_features].view(part.rank, in_features)
            )
            scales.append(part.scale)
            B = flat[part.b_at : part.b_at + out_features * part.rank].view(out_features, part.rank)
            b_by_shape[B.shape].append((layer.lora_BT[slot, : part.rank], B))
            if part.rank < self.rank:
                zero += [layer.lora_A[slot, part.rank :], layer.lora_BT[slot, part.rank :]]
        b_targets, b_sources = [], []
        for pairs in b_by_shape.values():
            b_targets += [target for target, _ in pairs]
            b_sources += torch.stack([B for _, B in pairs]).transpose(1, 2).contiguous().unbind()
        if zero:
            torch._foreach_zero_(zero)
        torch._foreach_copy_(a_targets + b_targets, a_sources + b_sources)
        torch._foreach_mul_(a_targets, scales)

    def staged_numel(self, rank: int) -> int:
        """Elements of a staged adapter of `rank` on every wrapped layer (what a loader can
        allocate before it has seen one)."""
        return sum(
            rank * (layer.base.in_features + layer.base.out_features) for layer in self.layers.values()
        )

    def clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear(slot)


@dataclass(frozen=True)
class StagedPart:
    rank: int
    a_at: int  # offset of A, (rank, in), in the flat buffer
    b_at: int  # offset of B, (out, rank), as stored: the pool transposes it on the device
    scale: float


@dataclass
class StagedAdapter:
    """One adapter ready for a pool slot: every layer's A and B as the file stores them, in one
    host buffer of the pool's dtype (pinned on CUDA). Scaling and transposing are left to the
    device, so that staging a file is one bulk dtype conversion."""

    flat: torch.Tensor
    parts: dict[str, StagedPart]  # module name -> where its tensors lie
    rank: int


def stage_weights(weights: Weights, dtype: torch.dtype) -> StagedAdapter:
    """(A, B, scale) per module, packed into one buffer."""
    flat = torch.empty(sum(A.numel() + B.numel() for A, B, _ in weights.values()), dtype=dtype)
    parts, offset = {}, 0
    for name, (A, B, scale) in weights.items():
        flat[offset : offset + A.numel()].view(A.shape).copy_(A)
        flat[offset + A.numel() : offset + A.numel() + B.numel()].view(B.shape).copy_(B)
        parts[name] = StagedPart(A.shape[0], offset, offset + A.numel(), scale)
        offset += A.numel() + B.numel()
    return StagedAdapter(flat, parts, max((p.rank for p in parts.values()), default=0))
