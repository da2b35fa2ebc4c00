"""Mixed-adapter LoRA over a stacked adapter pool (the punica / S-LoRA layout).

Every linear layer inside the decoder layers is wrapped: it holds A and B for all GPU slots,
stacked as A (slots, rank, in) and B (out, slots, rank), with each adapter's scale folded into its
A. A batch row's delta is computed against every slot at once and masked to the row's own slot:
x @ A_all^T gives (tokens, slots * rank), a per-row 0/1 mask keeps the row's slot, and that times
B_all^T is the delta. With a handful of slots and rank 16 both products are tiny (the pool holds
well under a megabyte per layer), nothing is gathered per step, the shapes never depend on which
adapters are in the batch (so a decode step can be captured once as a CUDA graph and replayed),
and a row of slot 0 (the base model) gets an exact zero delta. Adapters of smaller rank are
zero-padded up to the pool's rank, which grows (for every layer together) when needed."""
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn


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
        self.register_buffer("lora_B", weight.new_zeros(base.out_features, num_slots, 0), persistent=False)

    def grow_rank(self, rank: int) -> None:
        if rank <= self.rank:
            return
        grown_A = self.lora_A.new_zeros(self.num_slots, rank, self.base.in_features)
        grown_B = self.lora_B.new_zeros(self.base.out_features, self.num_slots, rank)
        grown_A[:, : self.rank] = self.lora_A
        grown_B[:, :, : self.rank] = self.lora_B
        self.lora_A, self.lora_B, self.rank = grown_A, grown_B, rank

    def write(self, slot: int, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        rank = A.shape[0]
        self.lora_A[slot, :rank].copy_(A, non_blocking=True)
        self.lora_A[slot, :rank].mul_(scale)
        self.lora_A[slot, rank:].zero_()
        self.lora_B[:, slot, :rank].copy_(B, non_blocking=True)
        self.lora_B[:, slot, rank:].zero_()

    def clear(self, slot: int) -> None:
        self.lora_A[slot].zero_()
        self.lora_B[:, slot].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.rank == 0:
            return y
        # x: (batch, tokens, in) -> (batch, tokens, slots * rank), masked to each row's slot.
        hidden = F.linear(x, self.lora_A.view(-1, self.base.in_features))
        mask = self.rows.mask[: x.shape[0]]
        hidden = hidden * (mask.unsqueeze(1) if x.dim() == 3 else mask)
        return y + F.linear(hidden, self.lora_B.view(self.base.out_features, -1))


class AdapterPool:
    """The GPU tier: `num_slots` adapters resident in the wrapped model at once (slot 0 = none).
    `version` changes whenever buffers are reallocated (captured graphs must then be redone)."""

    def __init__(self, model: nn.Module, num_slots: int, device: torch.device):
        dtype = next(model.parameters()).dtype
        self.rows = RowSlots(device, dtype)
        self.layers: dict[str, PooledLoraLinear] = {}
        self.num_slots = num_slots + 1
        self.rank = 0
        targets = [
            (name, module) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and ".layers." in name
        ]
        for name, module in targets:
            parent_name, _, attr = name.rpartition(".")
            wrapped = PooledLoraLinear(module, self.num_slots, self.rows)
            setattr(model.get_submodule(parent_name), attr, wrapped)
            self.layers[name] = wrapped

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

    def write(self, slot: int, weights: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """Put one adapter (module name -> (A, B, scale)) into `slot`; other slots are untouched.
        A and B in pinned host memory make this a set of asynchronous copies."""
        self.grow_rank(max(A.shape[0] for A, _, _ in weights.values()))
        for name, layer in self.layers.items():
            if name in weights:
                A, B, scale = weights[name]
                layer.write(slot, A, B, scale)
            else:
                layer.clear(slot)

    def clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear(slot)


def stage_weights(weights: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
                  dtype: torch.dtype, pin: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Weights converted to the pool's dtype (and pinned, for asynchronous copies to the GPU) off
    the engine thread, so that putting an adapter into a slot costs the engine almost nothing."""
    staged = {}
    for name, (A, B, scale) in weights.items():
        A, B = A.to(dtype).contiguous(), B.to(dtype).contiguous()
        staged[name] = (A.pin_memory(), B.pin_memory(), scale) if pin else (A, B, scale)
    return staged
