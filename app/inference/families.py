"""The decoder families the engine serves and what differs between them, as data for one forward.

Most differences are read off the model's own modules: fused `qkv_proj` (Phi-3), q/k norms
(Qwen3, Gemma 3), the post-attention and pre/post-feedforward norms around each block (Gemma),
per-layer sliding windows (`attn.sliding_window`, or `config.sliding_window` on every layer for
Mistral and Phi-3), and rope tables per layer type (Gemma 3's local and global bases). What the
modules hold but the forward of a family may ignore (soft-capping) is in SOFTCAPPING. Which families
are supported at all is app.core.model_families.FAMILIES, which the control plane reads too."""

from dataclasses import dataclass

from torch import nn

from app.core.model_families import FAMILIES, supported_families


class UnsupportedModel(ValueError):
    pass


@dataclass(frozen=True)
class Family:
    attention_softcap: bool = False  # attention logits go through config.attn_logit_softcapping
    final_softcap: bool = False  # the head's logits go through config.final_logit_softcapping


# The families whose forward soft-caps logits; every other family is Family().
SOFTCAPPING = {
    "gemma2": Family(attention_softcap=True, final_softcap=True),
    # Gemma3Attention keeps attn_logit_softcapping from the config but never applies it.
    "gemma3_text": Family(final_softcap=True),
}


@dataclass(frozen=True)
class LayerPlan:
    window: int | None  # attends to the last `window` positions (itself included); None: all
    rope: str | None  # the layer type whose rope tables it uses; None: the model's only tables
    softcap: float | None  # attention logit soft-capping


def _rope_parameters(config) -> dict[str | None, dict]:
    """Rope parameters per layer type where the config keys them so (Gemma 3), else {None: ...}."""
    rope = getattr(config, "rope_parameters", None) or {}
    types = set(getattr(config, "layer_types", None) or ())
    if types and types <= set(rope) and all(isinstance(rope[t], dict) for t in types):
        return {t: rope[t] for t in sorted(types)}
    return {None: rope}


def check_supported(config, context_window: int) -> None:
    """Refuse, saying why, a base model the decoder cannot serve exactly over `context_window`."""
    family = config.model_type
    if family not in FAMILIES:
        raise UnsupportedModel(
            f"serving does not support the {family} model family; supported: {supported_families()}"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModel(f"{family} with bidirectional attention (an embedding model) is not served")
    for params in _rope_parameters(config).values():
        # These rope types change their tables once a sequence grows past a length; up to it
        # the tables are fixed, which is what the decoder precomputes.
        kind = params.get("rope_type", "default")
        if kind == "longrope":
            fixed = params.get("original_max_position_embeddings")
        elif kind == "dynamic":
            fixed = config.max_position_embeddings
        else:
            continue
        if fixed is None or context_window > fixed:
            raise UnsupportedModel(
                f"{family} with rope type {kind} is served only up to {fixed} tokens of context "
                f"(the length its rope tables stay fixed for), not {context_window}: set "
                f"TUNEFORGE_MAX_CONTEXT_TOKENS to at most {fixed}"
            )


def layer_plans(model: nn.Module, context_window: int) -> list[LayerPlan]:
    config = model.config
    family = SOFTCAPPING.get(config.model_type, Family())
    per_type = None not in _rope_parameters(config)
    plans = []
    for layer in model.model.layers:
        attn = layer.self_attn
        window = getattr(attn, "sliding_window", getattr(config, "sliding_window", None))
        plans.append(
            LayerPlan(
                window=window if window and window < context_window else None,
                rope=attn.layer_type if per_type else None,
                softcap=config.attn_logit_softcapping if family.attention_softcap else None,
            )
        )
    return plans


def unit_offset_norm(config) -> bool:
    """Gemma's RMSNorm scales by 1 + weight (in fp32), the others by weight."""
    return config.model_type in ("gemma2", "gemma3_text")


def final_softcap(config) -> float | None:
    capped = SOFTCAPPING.get(config.model_type, Family()).final_softcap
    return config.final_logit_softcapping if capped else None


def rotary_tables(model: nn.Module, positions, probe) -> dict:
    """(cos, sin) for `positions`, computed by the model's own rotary module, per layer type where
    its rope differs by type, else under None."""
    rotary = model.model.rotary_emb
    types = list(_rope_parameters(model.config))
    if types == [None]:
        return {None: rotary(probe, positions)}
    return {t: rotary(probe, positions, t) for t in types}
