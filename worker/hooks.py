"""The contract between the worker loop and a training recipe (kept free of torch so the loop and
the test recipe start fast)."""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

log = logging.getLogger("tuneforge.worker")

# What the recipe should do at the next step boundary.
Control = Literal["continue", "pause", "shutdown"]


class TrainingHooks(Protocol):
    """Any hook may raise JobLost, which ends training at once."""

    # time.monotonic() when the worker claimed this attempt (for the first step's `since_claim_s`).
    claimed_at: float

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


@dataclass
class ResidentBase:
    """The base model a worker keeps loaded between jobs. worker/pipeline.py loads it (`model`, and
    `source`: the files and device it came from), attaches each job's LoRA and leaves `detach` to
    take it off again; it lives here, free of torch, so that the worker loop can own it."""

    source: Any = None
    model: Any = None
    detach: Callable[[], None] | None = None

    def end_job(self) -> None:
        """Take the job's LoRA off the base, after the job's adapter was published or the job
        stopped. A base whose LoRA could not be taken off is dropped: the next job loads it again."""
        detach, self.detach = self.detach, None
        if detach is None:
            return
        try:
            detach()
        except Exception:
            log.warning("removing the LoRA from the resident base failed; dropping the base", exc_info=True)
            self.forget()

    def forget(self) -> None:
        self.source = self.model = self.detach = None
