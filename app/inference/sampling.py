"""Next-token choice (greedy, temperature, nucleus) and the text a sequence may show so far
(stop strings cut the text; a partial stop string or a half-decoded character is held back)."""

from dataclasses import dataclass, field
from functools import partial

import torch

from app.inference.messages import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator(device="cpu")
    if params.seed is None:
        generator.seed()
    else:
        # Any integer is a seed; torch takes 0 .. 2**64 - 1.
        generator.manual_seed(params.seed % 2**64)
    return generator


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from a row of logits (vocab,)."""
    if params.greedy:
        return int(torch.argmax(logits))
    # In float64 and from the maximum down: any temperature the API accepts (1e-300 included)
    # then scales the logits to 0 and finite negatives or -inf, never to inf - inf = nan.
    logits = logits.double().cpu()
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p, and always the top token.
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        outside[0] = False
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


class Detokenizer:
    """The text of a growing sequence of token ids, decoding a window of a few tokens per new
    token instead of the whole sequence (prefix/read offsets, as vLLM does). The window starts at
    the previous step's tokens, so a tokenizer that drops the leading space at the start of a
    decode changes nothing, and text waits while it ends in half a multi-byte character."""

    def __init__(self, tokenizer):
        self._decode = partial(tokenizer.decode, skip_special_tokens=True)
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # the window's start
        self._read = 0  # ids before this are in `text`

    def add(self, token: int) -> None:
        self.ids.append(token)
        prefix = self._decode(self.ids[self._prefix : self._read])
        window = self._decode(self.ids[self._prefix :])
        if len(window) > len(prefix) and not window.endswith("\ufffd"):
            self.text += window[len(prefix) :]
            self._prefix, self._read = self._read, len(self.ids)

    def finish(self) -> None:
        """The text of all ids at once, a dangling partial character included."""
        self.text = self._decode(self.ids)
