"""Training data: JSONL rows (app.core.training_rows) → token ids with loss labels → batches.

Loss is taken only on what the model should learn to write: assistant turns of a chat, the
completion of a prompt/completion pair; `text` rows train on every token. Labels are -100 elsewhere.
"""

from dataclasses import dataclass
from os.path import commonprefix
from pathlib import Path

import torch
from jinja2 import TemplateError

from app.core.training_rows import BadLine, ChatRow, PromptCompletionRow, TextRow, TrainingRow, read_rows
from worker.errors import UserError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


# Stands in for a message's content: a private-use character, which no text starts or ends with.
_MARKER = "\ue000"


class UnmaskableChat(ValueError):
    """A chat template whose rendering of an answer cannot be told apart from its prompt."""


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _with_marker(messages: list[dict], i: int) -> list[dict]:
    return [*messages[:i], {**messages[i], "content": _MARKER}, *messages[i + 1 :]]


def _changed_span(text: str, other: str) -> tuple[int, int]:
    """The span of `text` where it differs from `other`: what lies between their common prefix and
    their common suffix."""
    start = len(commonprefix([text, other]))
    end = len(text) - len(commonprefix([text[start:][::-1], other[start:][::-1]]))
    return start, end


def _assistant_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the model sees it while writing its last answer, and the character span
    of each answer's content in it.

    The last answer follows the generation prompt of the conversation before it, as at inference:
    templates need not render a conversation so that it starts with the rendering of its prefixes
    (Mistral v0.3 puts the system message into the last user turn only when a generation follows,
    so a full rendering drops it; Qwen3 drops the <think> blocks of earlier answers; Phi-3 ends a
    finished conversation with EOS). A content's span is the text that changes when the content
    is replaced, so what the template writes around it (turn headers, Qwen3's empty <think>
    block, trimmed whitespace) stays masked. Messages after the last answer teach nothing."""
    last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
    context = _render(tokenizer, messages[:last], generation_prompt=True)
    spans = [
        _changed_span(context, _render(tokenizer, _with_marker(messages[:last], i), generation_prompt=True))
        for i, message in enumerate(messages[:last])
        if message["role"] == "assistant"
    ]
    # The last answer as the template writes it after a generation prompt, cut from a
    # conversation of one stand-in question.
    question = [{"role": "user", "content": "?"}]
    prompt = _render(tokenizer, question, generation_prompt=True)
    answer = _render(tokenizer, [*question, messages[last]])
    if not answer.startswith(prompt):
        raise UnmaskableChat(
            "it does not write an answer after its generation prompt, so the answer's tokens cannot be "
            "told from the prompt's"
        )
    start, end = _changed_span(answer, _render(tokenizer, _with_marker([*question, messages[last]], 1)))
    shift = len(context) - len(prompt)
    spans.append((start + shift, end + shift))
    return context + answer[len(prompt) :], spans


def _end_of_turn(text: str, end: int, tokens: list[tuple[int, tuple[int, int]]], special: set[int]) -> int:
    """Where an answer ending at `end` ends with its end-of-turn token: the first special token
    after it (<|eot_id|>, </s>, <|im_end|>, <end_of_turn>, <|end|>) when only whitespace is between,
    which the model must learn to write to stop."""
    for token, (start, stop) in tokens:
        if start >= end:
            return stop if token in special and not text[end:start].strip() else end
    return end


def _label_spans(text: str, spans: list[tuple[int, int]], tokenizer, end_of_turn: bool = False) -> Example:
    """Token ids of `text`, labelled where a token overlaps a span (a token that straddles a span's
    edge carries text of the span)."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    if end_of_turn:
        special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
        tokens = list(zip(ids, offsets, strict=True))
        # An empty span is an answer the template left out: the special token after it is not its.
        spans = [
            (start, _end_of_turn(text, end, tokens, special) if end > start else end) for start, end in spans
        ]
    labels = [
        token if any(start < stop and begin < end for start, end in spans) else IGNORE_INDEX
        for token, (begin, stop) in zip(ids, offsets, strict=True)
    ]
    return Example(ids, labels)


def tokenize_row(row: TrainingRow, tokenizer) -> Example:
    eos = [tokenizer.eos_token_id]
    match row:
        case ChatRow(messages):
            text, spans = _assistant_spans(messages, tokenizer)
            return _label_spans(text, spans, tokenizer, end_of_turn=True)
        case PromptCompletionRow(prompt, completion):
            text = prompt + completion
            example = _label_spans(text, [(len(prompt), len(text))], tokenizer)
            return Example(example.input_ids + eos, example.labels + eos)
        case TextRow(text):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + eos
            return Example(ids, list(ids))


def load_examples(path: Path, tokenizer, max_seq_length: int, param: str) -> list[Example]:
    """Every row of a JSONL file as an Example; a bad line is a user error that names it."""
    if not path.is_file():
        raise UserError("file_not_found", f"The {param} content is missing; upload the file again.", param)
    examples = []
    with open(path, "rb") as f:
        try:
            for number, row in read_rows(f):
                try:
                    example = tokenize_row(row, tokenizer)
                except (TemplateError, UnmaskableChat) as exc:
                    raise UserError(
                        "invalid_file_format",
                        f"Line {number} of the {param} cannot be rendered with the base model's chat "
                        f"template: {exc}.",
                        param,
                    ) from None
                if len(example.input_ids) > max_seq_length:
                    raise UserError(
                        "sequence_too_long",
                        f"Line {number} of the {param} is {len(example.input_ids)} tokens long, more than "
                        f"max_seq_length={max_seq_length}; shorten the example or raise max_seq_length.",
                        param,
                    )
                if all(label == IGNORE_INDEX for label in example.labels):
                    raise UserError(
                        "invalid_file_format",
                        f"Line {number} of the {param} has nothing to learn (no assistant or completion "
                        "tokens).",
                        param,
                    )
                examples.append(example)
        except BadLine as exc:
            raise UserError(
                "invalid_file_format", f"Line {exc.number} of the {param} is malformed: {exc.reason}", param
            ) from None
    if not examples:
        raise UserError("invalid_file_format", f"The {param} has no examples.", param)
    return examples


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """A padded batch for transformers' own forward and loss."""
    width = max(len(ex.input_ids) for ex in examples)
    ids = [ex.input_ids + [pad_id] * (width - len(ex.input_ids)) for ex in examples]
    labels = [ex.labels + [IGNORE_INDEX] * (width - len(ex.labels)) for ex in examples]
    mask = [[1] * len(ex.input_ids) + [0] * (width - len(ex.input_ids)) for ex in examples]
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "attention_mask": torch.tensor(mask),
    }


def epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of one epoch, a pure function of (seed, epoch): a resumed run picks up at
    the same example without storing any sampler state."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_examples, generator=generator).tolist()
