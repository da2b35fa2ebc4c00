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
own forward.

The frozen NF4 base layer runs as one autograd function that dequantizes the weight and multiplies
(and in backward dequantizes it again for the input gradient), as bitsandbytes does past 1,536 rows,
but without bitsandbytes' way there: `Linear4bit.forward`, `matmul_4bit`, its autograd function, a
`torch.library` custom op and the weight's `__torch_function__` on every view of it. A training step
on CUDA is host-bound (docs/BENCHMARKS.md) and it runs this for every linear layer in the forward, the
checkpointed recompute and backward."""

import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

HALF = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class _FrozenQuantized:
    """A Linear4bit's weight as plain tensors (packed 4-bit codes, fp32 block scales)."""

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    blocksize: int
    quant_type: str
    dtype: torch.dtype  # the layer's compute dtype, which its input must have
    impl: Callable  # bitsandbytes' CUDA dequantize kernel call, looked up once

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=dtype, device=self.packed.device)
        self.impl(self.packed, self.absmax, self.blocksize, self.quant_type, dtype, out=out)
        return out


class _FrozenQuantizedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: _FrozenQuantized) -> torch.Tensor:
        ctx.weight = weight  # not saved for backward: the layer holds it for the whole run
        return F.linear(x, weight.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.weight.dequantize(grad.dtype), None


def frozen_quantized(layer: torch.nn.Module) -> _FrozenQuantized | None:
    """`layer`'s weight for _FrozenQuantizedLinear, or None where bitsandbytes' own forward must run:
    not a bias-free 4-bit layer on CUDA with a 16-bit compute dtype and plain (not nested) block
    scales (worker/pipeline.py expands the nested ones at load), or a bitsandbytes without the CUDA
    dequantize function this calls (a private one: bitsandbytes is pinned to 0.50)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return None
    if type(layer) is not Linear4bit or layer.bias is not None or layer.compute_dtype not in HALF:
        return None
    state = getattr(layer.weight, "quant_state", None)
    if state is None or state.nested or not layer.weight.is_cuda or state.quant_type not in ("nf4", "fp4"):
        return None
    try:  # only with CUDA: the module reads CUDA bindings as it is imported
        from bitsandbytes.backends.cuda.ops import _dequantize_4bit_impl
    except ImportError:
        return None
    # .data: a plain tensor of the weight's storage, which Params4bit's __torch_function__ skips
    return _FrozenQuantized(
        layer.weight.data,
        state.absmax,
        state.shape,
        state.blocksize,
        state.quant_type,
        layer.compute_dtype,
        _dequantize_4bit_impl,
    )


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
    frozen = self._tuneforge_frozen
    if frozen is not None and x.dtype == frozen.dtype:
        result = _FrozenQuantizedLinear.apply(x, frozen)
    else:
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
            module._tuneforge_frozen = frozen_quantized(module.get_base_layer())
            count += 1
    return count
