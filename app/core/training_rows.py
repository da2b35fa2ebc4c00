"""The rows of a training file, defined once: upload validation and the worker read a JSONL file
with `read_rows`, so a file the API accepts is a file the worker can train on.

A row is one JSON object in one of three shapes, and every row of a file has the same shape:
{"messages": [...]} (chat, roles system/user/assistant), {"prompt", "completion"}, {"text"}.
"""

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatRow:
    format: ClassVar[str] = "chat"
    messages: list[dict[str, str]]  # each exactly {"role", "content"}


@dataclass(frozen=True)
class PromptCompletionRow:
    format: ClassVar[str] = "prompt_completion"
    prompt: str
    completion: str


@dataclass(frozen=True)
class TextRow:
    format: ClassVar[str] = "text"
    text: str


TrainingRow = ChatRow | PromptCompletionRow | TextRow


class BadRow(ValueError):
    """Why a JSON value is not a training row."""


class BadLine(ValueError):
    def __init__(self, number: int, reason: str):
        super().__init__(f"line {number}: {reason}")
        self.number, self.reason = number, reason


def _chat(messages: object) -> ChatRow:
    if not isinstance(messages, list) or not messages:
        raise BadRow("'messages' must be a non-empty list")
    has_answer = False
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRow(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise BadRow(f"messages[{i}].role is {role!r}; use one of system, user, assistant")
        if not isinstance(content, str):
            raise BadRow(f"messages[{i}].content must be a string")
        if role == "assistant" and content.strip():
            has_answer = True
    if not has_answer:
        raise BadRow("needs at least one assistant message with non-empty content to learn from")
    return ChatRow([{"role": m["role"], "content": m["content"]} for m in messages])


def _prompt_completion(prompt: object, completion: object) -> PromptCompletionRow:
    if not isinstance(prompt, str):
        raise BadRow("'prompt' must be a string")
    if not isinstance(completion, str) or not completion.strip():
        raise BadRow("'completion' must be a non-empty string")
    return PromptCompletionRow(prompt, completion)


def _text(text: object) -> TextRow:
    if not isinstance(text, str) or not text.strip():
        raise BadRow("'text' must be a non-empty string")
    return TextRow(text)


def parse_row(value: object) -> TrainingRow:
    """A decoded JSON line as a row, or BadRow saying what to change."""
    if not isinstance(value, dict):
        raise BadRow("each line must be a JSON object")
    if "messages" in value:
        return _chat(value["messages"])
    if "prompt" in value or "completion" in value:
        return _prompt_completion(value.get("prompt"), value.get("completion"))
    if "text" in value:
        return _text(value["text"])
    raise BadRow('expected one of {"messages": [...]}, {"prompt": ..., "completion": ...} or {"text": ...}')


def _json(line: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadRow(f"not valid JSON ({exc.msg} at column {exc.colno})") from None


def read_rows(lines: Iterable[bytes]) -> Iterator[tuple[int, TrainingRow]]:
    """(line number, row) for every non-blank line of a JSONL file opened in binary mode; the
    first bad line raises BadLine."""
    file_format = None
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise BadLine(number, "is not UTF-8 text") from None
        if not line:
            continue
        try:
            row = parse_row(_json(line))
            if file_format is not None and row.format != file_format:
                raise BadRow(
                    f"is in the {row.format} format but earlier lines are {file_format}; use one format"
                )
        except BadRow as exc:
            raise BadLine(number, str(exc)) from None
        file_format = row.format
        yield number, row
