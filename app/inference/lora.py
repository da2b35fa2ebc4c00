"""Mixed-adapter LoRA over a stacked adapter pool (the punica / S-LoRA layout).

Every linear layer inside the decoder layers is wrapped: it holds A and B for all GPU slots,
stacked as (slots, rank, in) and (slots, out, rank), and adds to each batch row the delta of the
adapter in that row's slot, gathered by index: one batched matmul pair per layer, whatever the mix
of adapters in the batch. Slot 0 stays zero: rows for the base model get an exact zero delta.
Adapters of smaller rank are zero-padded up to the pool's rank, which grows when needed."""
from collections.abc import Mapping

import torch
from torch import nn


class RowSlots:
    """Which pool slot each batch row uses in the next forward pass (set by the engine)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.slots: tuple[int, ...] = (0,)

    def set(self, slots: list[int]) -> None:
        self.slots = tuple(slots)
        self.index = torch.tensor(slots, dtype=torch.long, device=self.device)


class PooledLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, num_slots: int, rows: RowSlots):
        super().__init__()
        self.base = base
        self.rows = rows
        self.num_slots = num_slots
        self.rank = 0
        weight = base.weight
        self.register_buffer("lora_A", weight.new_zeros(num_slots, 0, base.in_features), persistent=False)
        self.register_buffer("lora_B", weight.new_zeros(num_slots, base.out_features, 0), persistent=False)
        self.register_buffer("scale", weight.new_zeros(num_slots), persistent=False)
        self.occupied = [False] * num_slots

    def grow_rank(self, rank: int) -> None:
        if rank <= self.rank:
            return
        grown_A = self.lora_A.new_zeros(self.num_slots, rank, self.base.in_features)
        grown_B = self.lora_B.new_zeros(self.num_slots, self.base.out_features, rank)
        grown_A[:, : self.rank] = self.lora_A
        grown_B[:, :, : self.rank] = self.lora_B
        self.lora_A, self.lora_B, self.rank = grown_A, grown_B, rank

    def write(self, slot: int, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        self.grow_rank(A.shape[0])
        self.clear(slot)
        self.lora_A[slot, : A.shape[0]] = A.to(self.lora_A.dtype)
        self.lora_B[slot, :, : B.shape[1]] = B.to(self.lora_B.dtype)
        self.scale[slot] = scale
        self.occupied[slot] = True

    def clear(self, slot: int) -> None:
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.scale[slot] = 0.0
        self.occupied[slot] = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not any(self.occupied[s] for s in self.rows.slots):
            return y
        index = self.rows.index
        # x: (batch, tokens, in) -> per-row (tokens, rank) -> (tokens, out)
        hidden = torch.bmm(x, self.lora_A[index].transpose(1, 2))
        delta = torch.bmm(hidden, self.lora_B[index].transpose(1, 2))
        return y + delta * self.scale[index].view(-1, 1, 1)


class AdapterPool:
    """The GPU tier: `num_slots` adapters resident in the wrapped model at once (slot 0 = none)."""

    def __init__(self, model: nn.Module, num_slots: int, device: torch.device):
        self.rows = RowSlots(device)
        self.layers: dict[str, PooledLoraLinear] = {}
        self.num_slots = num_slots + 1
        targets = [
            (name, module) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and ".layers." in name
        ]
        for name, module in targets:
            parent_name, _, attr = name.rpartition(".")
            wrapped = PooledLoraLinear(module, self.num_slots, self.rows)
            setattr(model.get_submodule(parent_name), attr, wrapped)
            self.layers[name] = wrapped

    def write(self, slot: int, weights: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """Put one adapter (module name -> (A, B, scale)) into `slot`; other slots are untouched."""
        for name, layer in self.layers.items():
            if name in weights:
                A, B, scale = weights[name]
                layer.write(slot, A, B, scale)
            else:
                layer.clear(slot)

    def clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear(slot)
