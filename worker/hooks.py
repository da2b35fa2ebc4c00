"""The contract between the worker loop and a training recipe (kept free of torch so the loop and
the test recipe start fast)."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

# What the recipe should do at the next step boundary.
Control = Literal["continue", "pause", "shutdown"]


class TrainingHooks(Protocol):
    """Any hook may raise JobLost, which ends training at once."""

    def control(self) -> Control: ...

    def log(self, message: str, data: dict) -> None: ...

    def record_hyperparameters(self, hyperparameters: dict, message: str, data: dict) -> None:
        """Record what the job's "auto" hyperparameters resolved to, with an event."""

    def save_checkpoint(self, step: int, write: Callable[[Path], None], metrics: dict) -> None: ...


@dataclass
class TrainResult:
    outcome: Control  # "continue": training completed; "pause"/"shutdown": stopped after a checkpoint
    step: int
    trained_tokens: int
    save_adapter: Callable[[Path], None]
