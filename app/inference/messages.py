"""What passes between the HTTP side and the engine, with no torch: a GenerationRequest in, then
TextDelta events and a Completion or a Failure out."""

from dataclasses import dataclass
from pathlib import Path


class EngineStopped(RuntimeError):
    pass


@dataclass(frozen=True)
class AdapterRef:
    version: str
    adapter_dir: Path


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterRef | None = None


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Completion:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failure:
    error: Exception
