"""Tiny random models of every supported family, built in the tests (no hub): 2 layers, hidden 64.
The Mistral, Qwen2 and Gemma configs slide windows of WINDOW tokens; the Gemma ones set
soft-capping. And the two sides of a serving parity check: the engine's greedy texts and
transformers + PEFT's greedy tokens."""

import asyncio

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

from app.core.settings import Settings
from app.inference.engine import Engine
from app.inference.messages import AdapterRef, Completion, Failure, GenerationRequest, SamplingParams

CONTEXT = 64
NEW_TOKENS = 12
WINDOW = 8
SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    initializer_range=0.05,
)
FAMILIES = {
    "llama": dict(
        model_type="llama",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "mistral": dict(model_type="mistral", sliding_window=WINDOW),
    # Layer 0 full, layer 1 sliding; biased q/k/v projections.
    "qwen2": dict(model_type="qwen2", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3": dict(model_type="qwen3"),
    "gemma2": dict(
        model_type="gemma2",
        sliding_window=WINDOW,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=5.0,
    ),
    "gemma3_text": dict(
        model_type="gemma3_text",
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=24,
        final_logit_softcapping=5.0,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
        },
    ),
    "phi3": dict(model_type="phi3"),
    # Phi-3.5 / Phi-4-mini style: longrope (served within its original length), partial rotary.
    "phi3_longrope": dict(
        model_type="phi3",
        partial_rotary_factor=0.5,
        rope_scaling={
            "rope_type": "longrope",
            "short_factor": [1.0, 1.5, 2.0, 2.5],
            "long_factor": [4.0, 4.0, 8.0, 8.0],
        },
        original_max_position_embeddings=CONTEXT,
    ),
}


def tiny_config(family: str, tokenizer, **overrides):
    spec = {**FAMILIES[family], **overrides}
    return AutoConfig.for_model(
        spec.pop("model_type"),
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SHAPE,
        **spec,
    )


def build_base(family: str, directory, tokenizer, **overrides) -> None:
    """A tiny random model of `family` (its config changed by `overrides`) with `tokenizer`, saved
    to `directory`. Its norm weights are randomised too, so that a norm in the wrong place shows."""
    torch.manual_seed(0)
    config = tiny_config(family, tokenizer, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def transformers_greedy(base_dir, ids: list[int], ref: AdapterRef | None) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if ref is not None:
        model = PeftModel.from_pretrained(model, ref.adapter_dir)
    prompt = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
    return out[0, len(ids) :].tolist()


def engine_texts(base_dir, data_dir, requests: list[tuple[list[int], AdapterRef | None]]) -> list[str]:
    """The engine's greedy texts for all requests, submitted together (one mixed batch)."""
    settings = Settings(
        data_dir=data_dir,
        device="cpu",
        base_models={base_dir.name: base_dir},
        serve_base_model=base_dir.name,
        gpu_adapter_slots=3,
        cpu_adapter_cache=3,
        max_context_tokens=CONTEXT,
    )
    engine = Engine(settings)
    engine.start()

    async def generate(ids, ref):
        params = SamplingParams(NEW_TOKENS, temperature=0.0)
        stream = engine.submit(GenerationRequest("test", ids, params, ref))
        text = ""
        while not isinstance(event := await stream.get(), Completion):
            if isinstance(event, Failure):
                raise event.error
            text += event.text
        return text

    async def all_requests():
        return await asyncio.gather(*(generate(ids, ref) for ids, ref in requests))

    try:
        return asyncio.run(all_requests())
    finally:
        engine.stop()
