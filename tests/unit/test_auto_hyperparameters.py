"""The "auto" rules (README, Fine-tuning jobs): batch size from the examples and their tokens, epochs
from the batch size."""

import pytest

from app.core.hyperparameters import AUTO_STEP_TOKENS, Hyperparameters, auto_batch_size


def test_benchmark_shaped_file_gets_a_step_of_about_one_micro_batch():
    # 3,000 prompt/completion examples of ~156 tokens (bench/job.py's file): 128 x 156 = 20k tokens.
    assert auto_batch_size(3000, 469_000) == 128
    resolved = Hyperparameters().resolve(3000, 469_000)
    # 24 steps an epoch: auto epochs keep at least 100 optimizer steps.
    assert (resolved.batch_size, resolved.n_epochs) == (128, 5)


@pytest.mark.parametrize(
    ("examples", "mean_tokens", "batch_size"),
    [
        (1, 10, 1),
        (20, 60, 1),  # the quick-start file: 20 steps an epoch, as before
        (31, 60, 1),
        (32, 60, 2),
        (256, 156, 16),  # limited by the steps per epoch
        (10**6, 156, 128),  # limited by the tokens per step
        (10**6, 1024, 16),
        (10**6, 4000, 4),
        (10**6, 20, 256),  # short examples: the API's largest batch
        (10**6, 100_000, 1),
    ],
)
def test_auto_batch_size(examples, mean_tokens, batch_size):
    assert auto_batch_size(examples, examples * mean_tokens) == batch_size


@pytest.mark.parametrize("examples", [1, 7, 16, 100, 3000, 10**5])
@pytest.mark.parametrize("mean_tokens", [1, 30, 156, 900, 5000])
def test_auto_batch_size_is_a_power_of_two_within_both_limits(examples, mean_tokens):
    batch_size = auto_batch_size(examples, examples * mean_tokens)
    assert batch_size & (batch_size - 1) == 0 and 1 <= batch_size <= 256
    if batch_size > 1:
        assert examples // batch_size >= 16
        assert batch_size * mean_tokens <= AUTO_STEP_TOKENS


def test_small_file_keeps_small_steps_and_enough_of_them():
    small = Hyperparameters().resolve(examples=10, tokens=600)
    assert small.batch_size == 1
    assert small.n_epochs * 10 >= 100
    assert small.model_dump()["learning_rate"] == pytest.approx(2e-4)
    big = Hyperparameters().resolve(examples=100_000, tokens=100_000 * 156)
    assert (big.batch_size, big.n_epochs) == (128, 3)


def test_explicit_hyperparameters_are_kept():
    requested = Hyperparameters(n_epochs=2, batch_size=4, learning_rate_multiplier=0.5, lora_r=8)
    hp = requested.resolve(examples=10, tokens=10**6)
    assert (hp.n_epochs, hp.batch_size, hp.lora_r) == (2, 4, 8)
    assert hp.learning_rate == pytest.approx(1e-4)
