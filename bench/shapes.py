"""Model shapes the GPU benchmarks build with random weights (no hub is reachable from the device).

`build_checkpoint(shape)` saves a bf16 checkpoint once under /tmp/bench-<shape> (or $BENCH_CKPT) and
returns its path. The 7B shape is built on the GPU (~20 s) rather than initialised on the CPU."""

import os

# Section of docs/benchmarks/latest.json each shape's figures go to ("train" nests its own).
RESULT_KEYS = {"tinyllama": "", "mistral7b": "_7b", "qwen3": "_qwen3", "tiny": "_tiny"}

_SPECIAL = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2, max_position_embeddings=4096)
SHAPES = {
    # TinyLlama-1.1B: the seed recipe's model.
    "tinyllama": (
        "llama",
        dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=32000,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        ),
    ),
    # Mistral-7B-v0.1 (full attention: its 4,096-token window covers every benchmark sequence).
    "mistral7b": (
        "mistral",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32000,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            sliding_window=None,
            tie_word_embeddings=False,
        ),
    ),
    # A 2-layer Llama with a 1,000-word vocabulary, for CPU runs of the scripts (bench/job.py
    # --device cpu, bench/http_path.py): a training step takes well under a second.
    "tiny": (
        "llama",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1000,
        ),
    ),
    # Qwen3-1.7B: per-head q/k RMSNorm, head_dim 128, tied embeddings, a 151,936-token vocabulary.
    "qwen3": (
        "qwen3",
        dict(
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            rms_norm_eps=1e-6,
            rope_theta=1_000_000.0,
            tie_word_embeddings=True,
        ),
    ),
}


def checkpoint_path(shape: str) -> str:
    return os.environ.get("BENCH_CKPT") or f"/tmp/bench-{shape}"


def build_checkpoint(shape: str = "tinyllama", path: str | None = None) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = path or checkpoint_path(shape)
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    model_type, fields = SHAPES[shape]
    config = AutoConfig.for_model(model_type, **fields, **_SPECIAL)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    return path
