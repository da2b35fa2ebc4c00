"""Training data: JSONL rows (app.core.training_rows) → token ids with loss labels → batches.

Loss is taken only on what the model should learn to write: assistant turns of a chat, the
completion of a prompt/completion pair; `text` rows train on every token. Labels are -100 elsewhere.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from app.core.training_rows import BadLine, ChatRow, PromptCompletionRow, TextRow, TrainingRow, read_rows
from worker.errors import UserError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


def _assistant_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns. Chat templates
    render by concatenation, so the text of turn i is what rendering messages[:i+1] adds to
    rendering messages[:i] followed by the assistant header."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = (
            len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
            if i
            else 0
        )
        end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
        spans.append((start, end))
    return text, spans


def _label_spans(text: str, spans: list[tuple[int, int]], tokenizer) -> Example:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [
        token if any(start <= offset[0] < end for start, end in spans) else IGNORE_INDEX
        for token, offset in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return Example(ids, labels)


def tokenize_row(row: TrainingRow, tokenizer) -> Example:
    eos = [tokenizer.eos_token_id]
    match row:
        case ChatRow(messages):
            text, spans = _assistant_spans(messages, tokenizer)
            return _label_spans(text, spans, tokenizer)
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
                example = tokenize_row(row, tokenizer)
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
