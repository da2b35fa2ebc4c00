"""Fine-tuning hyperparameters and their limits, defined once. The API validates a request with
`Hyperparameters` ("auto" allowed) and records `resolve()`'s `TrainingHyperparameters` on the job;
the worker validates that record with the same model before it trains."""

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

BASE_LEARNING_RATE = 2e-4
# The fewest optimizer steps "auto" aims for, so that a small file still teaches something.
AUTO_MIN_STEPS = 100

Auto = Literal["auto"]
Epochs = Annotated[int, Field(ge=1, le=50)]
BatchSize = Annotated[int, Field(ge=1, le=256)]
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

    def resolve(self, examples: int) -> "TrainingHyperparameters":
        """Every "auto" replaced with the value a job on `examples` examples runs with."""
        batch_size = min(16, max(1, examples // 16)) if self.batch_size == "auto" else self.batch_size
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
