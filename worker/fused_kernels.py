"""Fused kernels in a training run on CUDA: Liger's RMSNorm, SwiGLU MLP and rotary embeddings, and
variable-length flash attention over packed rows.

A step at batch 128 on the TinyLlama-1.1B shape launched ~9,500 kernels and the host, not the
GPU, set its pace (docs/BENCHMARKS.md). transformers' RMSNorm is ~8 kernels forward (fp32 upcast,
pow, mean, rsqrt, two multiplies, casts), its rotary ~12 for q and k, its SwiGLU two plus the saved
intermediate; Liger does each in one forward and one backward kernel, with the same fp32 math, and
its SwiGLU recomputes the activation in backward rather than keeping it. With them and varlen
attention (below) that step measured 7,300 kernels, a 5.4 GiB peak instead of 6.5 and 44,972
tokens/s instead of 32,104 (bench/profile_train.py, H200).

Only the families whose decoder is Llama's (RMSNorm in the Llama casting, a silu-gated MLP of
gate/up/down, rotate-half rotary) get them; the others, and every CPU run, keep transformers' modules.
The norms and MLPs are patched on the model instance (other models in the process are untouched);
rotary is a module-level function in transformers, so it is swapped only while a step runs
(`fused_training`).

Attention: a packed row holds several examples, and transformers' SDPA path turns their position
ids into a block-diagonal (rows x 1024 x 1024) mask that the kernel reads in full (and it waits for the
GPU to find out whether the rows are packed at all). `varlen_attention` instead gives PyTorch's
flash-attention varlen kernel each example as its own sequence (`cu_seqlens`, which
worker/pipeline.py computes on the host from the rows it packs): the same causal attention within
each example, without the masked-out blocks."""

import functools
import inspect
import sys
from contextlib import contextmanager

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

FAMILIES = {"llama", "mistral", "qwen2", "qwen3"}


def supports(model) -> bool:
    config = model.config.get_text_config()
    return config.model_type in FAMILIES and getattr(config, "hidden_act", None) in ("silu", "swish")


def use_fused_kernels(model) -> int:
    """Patch `model`'s (a transformers causal LM on CUDA) RMSNorms and MLPs to Liger's kernels;
    returns how many modules were patched (0 for a family this does not cover)."""
    if not supports(model):
        return 0
    from liger_kernel.transformers.monkey_patch import _patch_rms_norm_module, _patch_swiglu_module
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    decoder = model.get_decoder()
    norms = [decoder.norm]
    for layer in decoder.layers:
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
        attention = layer.self_attn
        norms += [getattr(attention, name) for name in ("q_norm", "k_norm") if hasattr(attention, name)]
        _patch_swiglu_module(layer.mlp, LigerSwiGLUMLP)
    for norm in norms:
        _patch_rms_norm_module(norm, eps=norm.variance_epsilon)
    model._tuneforge_fused_kernels = True
    return len(norms) + len(decoder.layers)


@functools.cache
def _varlen_attn():
    """torch's varlen flash attention with a causal window, or None where this torch lacks it (the
    `window_size` form is torch 2.11's and later's)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" not in params:
        return None
    return varlen_attn, "enable_gqa" in params


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention interface (query/key/value: batch x heads x tokens x head_dim; returns
    batch x tokens x heads x head_dim) over the sequences `tuneforge_cu_seqlens` delimits in the
    flattened batch; without them, SDPA."""
    cu_seqlens = kwargs.pop("tuneforge_cu_seqlens", None)
    max_seqlen = kwargs.pop("tuneforge_max_seqlen", None)
    if cu_seqlens is None or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    varlen_attn, native_gqa = _varlen_attn()
    batch, heads, tokens, head_dim = query.shape
    if not native_gqa and key.shape[1] != heads:
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
    window = kwargs.get("sliding_window")
    left = window - 1 if window is not None and window < max_seqlen else -1
    flat = [t.transpose(1, 2).reshape(batch * tokens, t.shape[1], head_dim) for t in (query, key, value)]
    gqa = {"enable_gqa": True} if native_gqa else {}
    out = varlen_attn(
        *flat, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scaling, window_size=(left, 0), **gqa
    )
    return out.view(batch, tokens, heads, head_dim), None


ATTENTION = "tuneforge_varlen"
AttentionInterface.register(ATTENTION, varlen_attention)


@contextmanager
def fused_training(model):
    """While the block runs (forward and backward: the checkpointed recompute runs inside
    `backward`), Liger's rotary and varlen attention for a model that use_fused_kernels patched."""
    if not getattr(model, "_tuneforge_fused_kernels", False):
        yield
        return
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    module = sys.modules[type(model.get_decoder().layers[0].self_attn).__module__]
    rotary, attention = module.apply_rotary_pos_emb, model.config._attn_implementation
    module.apply_rotary_pos_emb = liger_rotary_pos_emb
    if _varlen_attn() is not None:
        model.config._attn_implementation = ATTENTION
    try:
        yield
    finally:
        module.apply_rotary_pos_emb = rotary
        model.config._attn_implementation = attention
