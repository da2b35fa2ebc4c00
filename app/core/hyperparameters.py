"""Fine-tuning hyperparameters and their limits, defined once. The API validates a request with
`Hyperparameters` ("auto" allowed) and records it on the job as given; the worker validates that
record with the same model, and once it has tokenized the training file it records `resolve()`'s
`TrainingHyperparameters` in place of the request (the "auto" values depend on the token count, which
only a tokenizer of the base knows, and tokenizing a big file has no place in a request)."""

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

BASE_LEARNING_RATE = 2e-4
# The fewest optimizer steps "auto" aims for, so that a small file still teaches something.
AUTO_MIN_STEPS = 100
# Tokens an "auto" step aims for. Training is launch-bound: tokens/s rises with the tokens per step
# until a step fills one micro-batch of the worker's measured budget (24k tokens) and no further
# (H100, TinyLlama-1.1B shape, chat-length examples: batch 16 6,447 tokens/s, 128 29,006, 256
# 29,170; docs/BENCHMARKS.md). Fixed rather than the worker's memory-aware budget, so that a file
# gets the same batch size on any worker.
AUTO_STEP_TOKENS = 24576
# The fewest steps per epoch an "auto" batch leaves, so that a small file is not one or two big steps.
AUTO_MIN_STEPS_PER_EPOCH = 16

Auto = Literal["auto"]
Epochs = Annotated[int, Field(ge=1, le=50)]
MAX_BATCH_SIZE = 256
BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)]
LearningRateMultiplier = Annotated[float, Field(gt=0, le=100)]
ModuleNames = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]


class Hyperparameters(BaseModel):
    """OpenAI's three hyperparameters plus Tuneforge's LoRA settings."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: Auto | Epochs = "auto"
    batch_size: Auto | BatchSize = "auto"
    learning_rate_multiplier: Auto | LearningRateMultiplier = "auto"
    lora_r: int = Field(16, ge=1, le=256)
    lora_alpha: int = Field(32, ge=1, le=4096)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    # "all-linear" or module names such as q_proj.
    target_modules: Literal["all-linear"] | ModuleNames = "all-linear"
    max_seq_length: int = Field(1024, ge=16, le=32768)
    packing: bool = True

    def resolve(self, examples: int, tokens: int) -> "TrainingHyperparameters":
        """Every "auto" replaced with the value a job on `examples` examples of `tokens` tokens in
        all (as the worker tokenizes them) runs with."""
        batch_size = auto_batch_size(examples, tokens) if self.batch_size == "auto" else self.batch_size
        n_epochs = self.n_epochs
        if n_epochs == "auto":
            steps_per_epoch = math.ceil(examples / batch_size)
            n_epochs = min(25, max(3, math.ceil(AUTO_MIN_STEPS / steps_per_epoch)))
        multiplier = 1.0 if self.learning_rate_multiplier == "auto" else self.learning_rate_multiplier
        return TrainingHyperparameters(
            **{
                **dict(self),
                "n_epochs": n_epochs,
                "batch_size": batch_size,
                "learning_rate_multiplier": multiplier,
            }
        )


def auto_batch_size(examples: int, tokens: int) -> int:
    """The largest power of two that is at most examples / AUTO_MIN_STEPS_PER_EPOCH and whose step
    of mean-length examples holds at most AUTO_STEP_TOKENS tokens, between 1 and 256."""
    mean_tokens = max(tokens, 1) / max(examples, 1)
    limit = min(examples / AUTO_MIN_STEPS_PER_EPOCH, AUTO_STEP_TOKENS / mean_tokens)
    batch_size = 1
    while batch_size * 2 <= min(limit, MAX_BATCH_SIZE):
        batch_size *= 2
    return batch_size


class TrainingHyperparameters(Hyperparameters):
    """Hyperparameters with no "auto" left: what a job records and the worker trains with. Its
    record (`model_dump()`) carries the derived learning_rate for readers; `from_record` drops it."""

    n_epochs: Epochs
    batch_size: BatchSize
    learning_rate_multiplier: LearningRateMultiplier

    @computed_field
    @property
    def learning_rate(self) -> float:
        return BASE_LEARNING_RATE * self.learning_rate_multiplier

    @classmethod
    def from_record(cls, record: dict) -> "TrainingHyperparameters":
        return cls.model_validate({k: v for k, v in record.items() if k != "learning_rate"})
