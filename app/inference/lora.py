"""Per-row LoRA over a stacked adapter pool (the punica / S-LoRA layout), on fused base projections.

The projections of a decoder layer that share an input run as one base GEMM each (q/k/v, gate/up;
Phi-3 ships them fused), so a layer has four `LoraGroup`s: qkv, o, gate_up and down. A group holds,
for every GPU slot, its members' A matrices stacked, A (slots, members * rank, in), with each
adapter's scale folded in, and their B matrices transposed side by side, BT (slots, rank, out). A
token's delta is gathered from its own slot only (`lora_kernels`: BGMV-style shrink and expand), so
the cost of a batch does not depend on how many adapters are resident, slot 0 (the base model) costs
nothing, and each slot's real rank (`ranks`) bounds the work: adapters of ranks 8 to 64 share a
batch. The shapes never depend on which adapters are in the batch, so a decode step is captured
once as a CUDA graph. Adapters of smaller rank are zero-padded up to the pool's rank, which grows
(for every layer together) when needed."""

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from app.inference.lora_kernels import lora_add, lora_apply, lora_partial_sums

Weights = Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]  # name -> (A, B, scale)

# Per layer: the group name, then its members as (attribute path, fused alternative).
GROUPS = (
    ("qkv", ("self_attn", ("q_proj", "k_proj", "v_proj"), "qkv_proj")),
    ("o", ("self_attn", ("o_proj",), None)),
    ("gate_up", ("mlp", ("gate_proj", "up_proj"), "gate_up_proj")),
    ("down", ("mlp", ("down_proj",), None)),
)


def _members(layer) -> list[tuple[str, str, list[str]]]:
    """(group, parent attribute, member attributes) of one decoder layer."""
    out = []
    for group_name, (parent_name, names, fused) in GROUPS:
        parent = getattr(layer, parent_name)
        out.append((group_name, parent_name, [fused] if fused and hasattr(parent, fused) else list(names)))
    return out


def slot_bytes(model: nn.Module, rank: int) -> int:
    """Memory one pool slot (or CPU tier entry) of `rank` takes on `model`; a pool built on the
    model keeps its modules, so this holds before and after."""
    numel = 0
    for layer in model.model.layers:
        for _, parent_name, members in _members(layer):
            modules = [getattr(getattr(layer, parent_name), m) for m in members]
            numel += rank * (len(modules) * modules[0].in_features + sum(m.out_features for m in modules))
    return numel * next(model.parameters()).dtype.itemsize


class LoraGroup:
    """One fused base projection of a layer and its members' pooled LoRA."""

    def __init__(
        self,
        modules: list[tuple[str, nn.Linear]],
        num_slots: int,
        ranks: torch.Tensor,
        stream: "torch.cuda.Stream | None" = None,
    ):
        weights = [m.weight for _, m in modules]
        self.in_features = weights[0].shape[1]
        self.weight = torch.cat(weights) if len(weights) > 1 else weights[0]
        biases = [m.bias for _, m in modules]
        self.bias = None
        if any(b is not None for b in biases):
            zeros = [w.new_zeros(w.shape[0]) for w in weights]
            self.bias = torch.cat([b if b is not None else z for b, z in zip(biases, zeros, strict=True)])
        # The modules keep views of the fused weight: the model's own forward (and its memory) unchanged.
        starts = [0]
        for (_, module), w in zip(modules, weights, strict=True):
            module.weight.data = self.weight[starts[-1] : starts[-1] + w.shape[0]]
            starts.append(starts[-1] + w.shape[0])
        self.out_starts = tuple(starts)
        self.members = {name: j for j, (name, _) in enumerate(modules)}
        self.ranks = ranks
        self.stream = stream
        self.num_slots = num_slots
        self.rank = 0
        self.A = self.weight.new_zeros(num_slots, 0, self.in_features)
        self.BT = self.weight.new_zeros(num_slots, 0, starts[-1])

    def grow_rank(self, rank: int) -> None:
        if rank <= self.rank:
            return
        n = len(self.members)
        A = self.A.new_zeros(self.num_slots, n * rank, self.in_features)
        BT = self.BT.new_zeros(self.num_slots, rank, self.BT.shape[2])
        for j in range(n):
            A[:, j * rank : j * rank + self.rank] = self.A[:, j * self.rank : (j + 1) * self.rank]
        BT[:, : self.rank] = self.BT
        self.A, self.BT, self.rank = A, BT, rank

    def __call__(
        self, x: torch.Tensor, slots: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (tokens, in); slots: (tokens,) each token's pool slot. Returns the base projection
        plus the LoRA delta, or, given `residual` (the tensor the caller adds the output to,
        shaped like the output), the base projection alone with the delta added into `residual`.

        On CUDA the LoRA kernels run on the pool's side stream beside the base GEMM: they would
        otherwise wait for it, then the GEMM for them, each costing its latency in a decode step
        (a CUDA graph keeps the two branches). The shrink needs only x; the expand needs the GEMM's
        output too unless it goes into `residual`, which nothing reads meanwhile."""
        if not self.rank:
            return F.linear(x, self.weight, self.bias)
        lora = (self.A, self.BT, slots, self.ranks, self.out_starts)
        if self.stream is None:
            y = F.linear(x, self.weight, self.bias)
            lora_apply(x, y if residual is None else residual, *lora)
            return y
        main = torch.cuda.current_stream(x.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            parts = lora_partial_sums(x, self.A, slots, self.ranks, len(self.members))
            if residual is not None:
                lora_add(parts, *lora[1:], residual)
        y = F.linear(x, self.weight, self.bias)
        # Everything the side stream touched (x, parts, residual) is still referenced here, so
        # no main-stream allocation can take its memory before this join.
        main.wait_stream(self.stream)
        if residual is None:
            lora_add(parts, *lora[1:], y)
        return y


class AdapterPool:
    """The GPU tier: `num_slots` adapters resident at once (slot 0 = none), over the fused
    projections of every decoder layer. `version` changes whenever buffers are reallocated
    (captured graphs must then be redone)."""

    def __init__(self, model: nn.Module, num_slots: int, device: torch.device, rank: int = 0):
        self.dtype = next(model.parameters()).dtype
        self.device = device
        self.num_slots = num_slots + 1
        self.ranks = torch.zeros(self.num_slots, dtype=torch.int32, device=device)
        self.rank = 0
        self.version = 0
        # Where every group's LoRA kernels run beside its base GEMM (LoraGroup.__call__).
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.layers: list[dict[str, LoraGroup]] = []
        # PEFT module name -> (group, member index)
        self.targets: dict[str, tuple[LoraGroup, int]] = {}
        for index, layer in enumerate(model.model.layers):
            groups = {}
            for group_name, parent_name, members in _members(layer):
                parent = getattr(layer, parent_name)
                prefix = f"model.layers.{index}.{parent_name}."
                with torch.no_grad():
                    group = LoraGroup(
                        [(prefix + m, getattr(parent, m)) for m in members],
                        self.num_slots,
                        self.ranks,
                        self.stream,
                    )
                groups[group_name] = group
                for name, j in group.members.items():
                    self.targets[name] = (group, j)
            self.layers.append(groups)
        self.grow_rank(rank)

    def groups(self):
        return (group for layer in self.layers for group in layer.values())

    def grow_rank(self, rank: int) -> None:
        if rank <= self.rank:
            return
        for group in self.groups():
            group.grow_rank(rank)
        self.rank = rank
        self.version += 1

    def write(self, slot: int, adapter: "StagedAdapter | Weights") -> None:
        """Put one adapter into `slot`; other slots are untouched. A StagedAdapter in pinned host
        memory goes over in one asynchronous copy; on the device each A lands (then is scaled) in
        its member's rows and each B, transposed, in its member's columns, as a few batched
        copies."""
        if not isinstance(adapter, StagedAdapter):
            adapter = stage_weights(adapter, self.dtype)
        self.grow_rank(adapter.rank)
        unknown = set(adapter.parts) - set(self.targets)
        if unknown:
            raise ValueError(f"the adapter targets modules the pool does not hold: {sorted(unknown)[:3]}")
        flat = adapter.flat.to(self.device, non_blocking=True)
        R = self.rank
        groups = list(self.groups())
        zero = [g.A[slot] for g in groups] + [g.BT[slot] for g in groups]
        targets, sources, a_targets, scales = [], [], [], []
        for name, part in adapter.parts.items():
            group, j = self.targets[name]
            start, end = group.out_starts[j], group.out_starts[j + 1]
            A_target = group.A[slot, j * R : j * R + part.rank]
            a_targets.append(A_target)
            scales.append(part.scale)
            targets += [A_target, group.BT[slot, : part.rank, start:end]]
            A = flat[part.a_at : part.a_at + part.rank * group.in_features]
            B = flat[part.b_at : part.b_at + (end - start) * part.rank]
            sources += [A.view(part.rank, group.in_features), B.view(end - start, part.rank).t()]
        torch._foreach_zero_(zero)
        torch._foreach_copy_(targets, sources)
        torch._foreach_mul_(a_targets, scales)
        self.ranks[slot] = adapter.rank

    def staged_numel(self, rank: int) -> int:
        """Elements of a staged adapter of `rank` on every projection (what a loader can allocate
        before it has seen one)."""
        return sum(rank * len(g.members) * g.in_features + rank * g.BT.shape[2] for g in self.groups())

    def clear(self, slot: int) -> None:
        # Rank 0: the kernels skip the slot; `write` zeroes it before the next adapter lands.
        self.ranks[slot] = 0


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
