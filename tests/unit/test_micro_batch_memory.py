"""worker/memory.py: tokens per micro-batch from the model's shape and the memory a run may use."""

import pytest

from worker.memory import (
    DEVICE_RESERVE_BYTES,
    GIB,
    TrainShape,
    cuda_allocator_environment,
    micro_batch_tokens,
)

CEILING = 24576
# Resident bytes: NF4 linear weights (~0.516 bytes a parameter with double quantization), bf16
# embeddings and lm_head, fp32 LoRA r=16 on every linear layer (the trainable bytes).
TINYLLAMA = TrainShape(
    layers=22,
    hidden_size=2048,
    vocab_size=32000,
    resident_bytes=int(0.76 * GIB),
    trainable_bytes=22 * 16 * 35_840 * 4,
)
MISTRAL_7B = TrainShape(
    layers=32,
    hidden_size=4096,
    vocab_size=32768,
    resident_bytes=int(4.0 * GIB),
    trainable_bytes=32 * 16 * 81_920 * 4,
)


def free_on(card_gib: float, shape: TrainShape) -> int:
    """Free bytes on a card of that size once the model is loaded (0.5 GiB of CUDA context)."""
    return int((card_gib - 0.5) * GIB) - shape.resident_bytes


@pytest.mark.parametrize(("shape", "measured_gib"), [(TINYLLAMA, 7.0), (MISTRAL_7B, 20.7)])
def test_estimate_is_above_the_measured_peaks(shape, measured_gib):
    # bench/train.py on an H200, batch 128 of chat-length examples: ~22 rows of 1024 tokens.
    estimate = shape.estimated_peak_bytes(22 * 1024) / GIB
    assert measured_gib < estimate < measured_gib * 1.25


def test_small_model_on_a_big_card_keeps_the_measured_best():
    assert micro_batch_tokens(TINYLLAMA, free_on(80, TINYLLAMA), None, CEILING) == CEILING
    assert micro_batch_tokens(TINYLLAMA, free_on(80, TINYLLAMA), 22 * GIB, CEILING) == CEILING


def test_7b_under_a_22_gib_cap_fits_it_and_keeps_most_of_a_step():
    tokens = micro_batch_tokens(MISTRAL_7B, free_on(141, MISTRAL_7B), 22 * GIB, CEILING)
    assert MISTRAL_7B.estimated_peak_bytes(tokens) <= 22 * GIB
    assert MISTRAL_7B.estimated_peak_bytes(tokens + 1) > 22 * GIB
    # 20 rows of 1024: a step of 128 chat-length examples (~21 rows) stays about one micro-batch.
    assert 20 * 1024 <= tokens < CEILING


def test_7b_on_a_24_gb_card_fits_what_is_free():
    free = free_on(24, MISTRAL_7B)
    tokens = micro_batch_tokens(MISTRAL_7B, free, None, CEILING)
    assert MISTRAL_7B.estimated_peak_bytes(tokens) + DEVICE_RESERVE_BYTES <= MISTRAL_7B.resident_bytes + free
    assert tokens >= 16 * 1024


def test_more_memory_never_means_fewer_tokens():
    budgets = [
        micro_batch_tokens(MISTRAL_7B, free_on(141, MISTRAL_7B), gib * GIB, CEILING) for gib in range(4, 40)
    ]
    assert budgets == sorted(budgets) and budgets[-1] == CEILING


def test_nothing_left_for_activations_gives_zero():
    assert micro_batch_tokens(MISTRAL_7B, free_on(141, MISTRAL_7B), 6 * GIB, CEILING) == 0
    assert micro_batch_tokens(MISTRAL_7B, int(0.5 * GIB), None, CEILING) == 0


def test_the_worker_uses_expandable_segments_unless_the_user_set_the_allocator(monkeypatch):
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    assert cuda_allocator_environment() == {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    assert cuda_allocator_environment() == {}
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "")  # PyTorch's own defaults, chosen explicitly
    assert cuda_allocator_environment() == {}
