"""Training data: JSONL rows (app.core.training_rows) → token ids with loss labels → batches.

Loss is taken only on what the model should learn to write: assistant turns of a chat, the
completion of a prompt/completion pair; `text` rows train on every token. Labels are -100 elsewhere.
"""

import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from os.path import commonprefix
from pathlib import Path
from typing import overload

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from datasets.arrow_writer import ArrowWriter
from jinja2 import TemplateError

from app.core.training_rows import (
    BadLine,
    ChatRow,
    PromptCompletionRow,
    TextRow,
    TrainingRow,
    parse_row,
    read_rows,
)
from worker.errors import UserError

IGNORE_INDEX = -100

# The worker reports progress in job events; datasets' bars would only fill its log.
datasets.disable_progress_bars()


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
    # In numpy: the same test in a Python loop over the tokens added 15-30 % to the tokenizer's time.
    begin, stop = np.array(offsets, dtype=np.int64).reshape(-1, 2).T
    learned = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        learned |= (start < stop) & (begin < end)
    return Example(ids, np.where(learned, ids, IGNORE_INDEX).tolist())


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


def checked_example(number: int, row: TrainingRow, tokenizer, max_seq_length: int, param: str) -> Example:
    """`tokenize_row`, or the user error of a row the recipe cannot train on, naming its line."""
    try:
        example = tokenize_row(row, tokenizer)
    except (TemplateError, UnmaskableChat) as exc:
        raise UserError(
            "invalid_file_format",
            f"Line {number} of the {param} cannot be rendered with the base model's chat template: {exc}.",
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
            f"Line {number} of the {param} has nothing to learn (no assistant or completion tokens).",
            param,
        )
    return example


class TokenizedExamples(Sequence[Example]):
    """A tokenized file as the recipe sees it: Examples by index, read from memory-mapped Arrow
    files, so that a million rows are not a million Python lists; `lengths` holds every example's
    token count."""

    def __init__(self, dataset: datasets.Dataset):
        self._dataset = dataset
        self.lengths = pc.list_value_length(dataset.data.column("input_ids")).to_numpy()

    def __len__(self) -> int:
        return len(self._dataset)

    @overload
    def __getitem__(self, index: int) -> Example: ...

    @overload
    def __getitem__(self, index: slice) -> list[Example]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self._dataset[index]
        return Example(row["input_ids"], row["labels"])


# Every shape's columns, so that the rows have a schema before the first one is read (and a file
# of blank lines is an empty dataset); a row leaves the other shapes' columns null.
_ROW_FEATURES = datasets.Features(
    {
        "line": datasets.Value("int64"),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        "prompt": datasets.Value("string"),
        "completion": datasets.Value("string"),
        "text": datasets.Value("string"),
    }
)
_NULL_ROW = dict.fromkeys(_ROW_FEATURES)
_TOKENIZED_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        # The user error of a row the recipe cannot train on, null for the others.
        "error_code": datasets.Value("string"),
        "error_message": datasets.Value("string"),
    }
)


def arrow_rows(path: Path, arrow_file: Path, param: str) -> datasets.Dataset:
    """The validated rows of a JSONL file, written to an Arrow file as they are read, and each
    row's line number."""
    with open(path, "rb") as f, ArrowWriter(features=_ROW_FEATURES, path=str(arrow_file)) as writer:
        try:
            for number, row in read_rows(f):
                writer.write({**_NULL_ROW, "line": number, **asdict(row)})
        except BadLine as exc:
            raise UserError(
                "invalid_file_format", f"Line {exc.number} of the {param} is malformed: {exc.reason}", param
            ) from None
        writer.finalize()
    return datasets.Dataset.from_file(str(arrow_file))


def _tokenize_batch(batch: dict[str, list], tokenizer, max_seq_length: int, param: str) -> dict[str, list]:
    columns = {"input_ids": [], "labels": [], "error_code": [], "error_message": []}
    shapes = [name for name in batch if name != "line"]
    for i, number in enumerate(batch["line"]):
        row = parse_row({name: batch[name][i] for name in shapes if batch[name][i] is not None})
        try:
            example, error = checked_example(number, row, tokenizer, max_seq_length, param), None
        except UserError as exc:
            example, error = Example([], []), exc
        columns["input_ids"].append(example.input_ids)
        columns["labels"].append(example.labels)
        columns["error_code"].append(error and error.code)
        columns["error_message"].append(error and error.message)
    return columns


# Smaller files tokenize in this process. Starting the processes and handing each the tokenizer
# cost ~0.6 s (2 cores, bench/tokenization.py) and a process tokenizes ~1.5 MB/s, so below this a
# pool saves under ~2 s on any number of cores, and on a busy host it loses.
PARALLEL_MIN_BYTES = 4 * 2**20


def default_processes(path: Path) -> int:
    """Every core this process may run on (its share, when the job's ranks tokenize side by side),
    for a file big enough to pay for them."""
    if path.stat().st_size < PARALLEL_MIN_BYTES:
        return 1
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("WORLD_SIZE", "1")))


def load_examples(
    path: Path,
    tokenizer,
    max_seq_length: int,
    param: str,
    work_dir: Path | None = None,
    processes: int | None = None,
) -> TokenizedExamples:
    """Every row of a JSONL file as an Example, tokenized by `processes` processes (by default
    `default_processes`). A bad line is a user error that names it: the first malformed line, else
    the first line the recipe cannot train on, whichever process tokenized it."""
    if not path.is_file():
        raise UserError("file_not_found", f"The {param} content is missing; upload the file again.", param)
    processes = processes or default_processes(path)
    # In the job's dir (a crash's leftovers go with the job's temps), else next to the file: on the
    # disk that holds files of its size (/tmp may be small, or memory).
    work_dir = work_dir or path.parent
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-tokenized-", dir=work_dir) as cache_dir:
        rows = arrow_rows(path, Path(cache_dir) / "rows.arrow", param)
        if not len(rows):
            raise UserError("invalid_file_format", f"The {param} has no examples.", param)
        tokenized = rows.map(
            _tokenize_batch,
            fn_kwargs={"tokenizer": tokenizer, "max_seq_length": max_seq_length, "param": param},
            batched=True,
            remove_columns=rows.column_names,
            features=_TOKENIZED_FEATURES,
            num_proc=processes if processes > 1 else None,
            new_fingerprint="tokenized",  # the cache dir is new: nothing to find by the transform's hash
        )
    # The dataset's files stay readable through their memory maps after the dir is removed; their
    # disk is freed when the dataset is dropped, and a failed job leaves nothing behind.
    failed = pc.index(pc.is_valid(tokenized.data.column("error_code")), True).as_py()
    if failed >= 0:
        raise UserError(tokenized[failed]["error_code"], tokenized[failed]["error_message"], param)
    return TokenizedExamples(tokenized.select_columns(["input_ids", "labels"]))


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
