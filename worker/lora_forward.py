"""The training forward of a LoRA-wrapped linear layer, with less memory traffic than PEFT's.

PEFT computes `result = base(x).clone(); result = result + lora_B(lora_A(dropout(x))) * scaling`:
besides the two small LoRA GEMMs, that is a copy, a multiply and an add over the full
(tokens x out_features) output, each a separate kernel, in the forward, again in the
checkpointed recompute, and the multiply once more in backward. Here the scale and the add are
folded into one `addmm` (the GEMM epilogue does them) and the defensive clone is dropped, since
nothing is written in place. Same parameters, same math, same saved adapter: only the rounding of
the bf16 sum differs (addmm accumulates in fp32). On CUDA the input dropout and lora_A are one
kernel in training (worker/lora_dropout.py). Anything but the single plain adapter of a
training run (merged, disabled, mixed-batch `adapter_names`, DoRA and other variants) runs PEFT's
own forward."""

import types

import torch
from peft.tuners.lora import LoraLayer


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    if (
        name is None
        or kwargs
        or args
        or self.merged
        or self.disable_adapters
        or name not in self.lora_A
        or name in self.lora_variant
    ):
        return type(self).forward(self, x, *args, **kwargs)
    lora_A, lora_B = self.lora_A[name], self.lora_B[name]
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != lora_A.weight.dtype:
        return type(self).forward(self, x)
    result = self.base_layer(x)
    dropout = self.lora_dropout[name]
    if _fusable(x, lora_A, dropout):
        from worker.lora_dropout import dropout_shrink

        hidden = dropout_shrink(x, lora_A.weight, dropout.p)
    else:
        hidden = lora_A(dropout(x))
    out = torch.addmm(
        result.reshape(-1, result.shape[-1]),
        hidden.reshape(-1, hidden.shape[-1]),
        lora_B.weight.t(),
        alpha=self.scaling[name],
    )
    return out.view(result.shape)


def _fusable(x: torch.Tensor, lora_A: torch.nn.Module, dropout: torch.nn.Module) -> bool:
    """Whether the dropout and lora_A run as one kernel (worker/lora_dropout.py): a dropout that
    drops (training, p > 0), on CUDA, bf16 or fp16 inputs, a plain bias-free lora_A."""
    if not (isinstance(dropout, torch.nn.Dropout) and dropout.training and dropout.p > 0):
        return False
    if not x.is_cuda or type(lora_A) is not torch.nn.Linear or lora_A.bias is not None:
        return False
    from worker.lora_dropout import supported

    return supported(x, lora_A.weight)


def use_fused_lora_forward(model) -> int:
    """Switch every LoRA linear layer of `model` to the fused training forward; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), torch.nn.Linear):
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
