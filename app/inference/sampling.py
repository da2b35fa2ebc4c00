"""Next-token choice (greedy, temperature, nucleus) and the text a sequence may show so far
(stop strings cut the text; a partial stop string or a half-decoded character is held back)."""

from dataclasses import dataclass, field

import torch


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


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator(device="cpu")
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from a row of logits (vocab,)."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float().cpu() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs[outside] = 0.0
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class TextTracker:
    """Follows the decoded text of one sequence and hands out the part that is final."""

    stop: tuple[str, ...]
    emitted: int = 0
    stopped: bool = field(default=False)

    def advance(self, text: str, finished: bool) -> str:
        """The new final text given the whole decoded text so far. Sets `stopped` when a stop
        string appeared: the text ends before it."""
        end = len(text)
        search_from = max(0, self.emitted - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (text.find(s, search_from) for s in self.stop if s) if i >= 0]
        if hits:
            end = min(hits)
            self.stopped = True
        elif not finished:
            end -= self._holdback(text)
        delta = text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta

    def _holdback(self, text: str) -> int:
        # Trailing U+FFFD: a multi-byte character still being generated.
        hold = len(text) - len(text.rstrip("\ufffd"))
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        return hold
