"""load_examples: a JSONL file tokenized through `datasets` gives the Examples tokenize_row gives
row by row, the same line-numbered user errors in one process or several, and leaves no files."""

import json
import tempfile
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from app.core.artifacts import remove_stale_temps
from app.core.training_rows import parse_row
from worker.data import load_examples, tokenize_row
from worker.errors import UserError

ROWS = {
    "chat": [
        {
            "messages": [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": f"Capital number {i}?"},
                {"role": "assistant", "content": "Paris." if i % 2 else "Rome, évidemment. 🍕"},
                {"role": "user", "content": "Sure?"},
                {"role": "assistant", "content": "Yes." * (i % 3 + 1)},
            ]
        }
        for i in range(7)
    ],
    "prompt_completion": [{"prompt": f"{i}+{i}=" if i else "", "completion": f" {2 * i}"} for i in range(7)],
    "text": [{"text": f"Line {i} of plain prose,\n  with ünïcode and spaces. "} for i in range(7)],
}


@pytest.fixture(scope="module")
def tokenizer(base_model_dir):
    return AutoTokenizer.from_pretrained(base_model_dir)


def write(path, lines: list) -> None:
    """`lines` are dicts (written as JSON) or raw strings (written as they are)."""
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def only_the_file_is_left(path) -> bool:
    return list(path.parent.iterdir()) == [path]


# Two processes: each tokenizes half of the rows (datasets' map, num_proc=2).
PROCESSES = [pytest.param(1, id="1 process"), pytest.param(2, marks=pytest.mark.slow, id="2 processes")]


@pytest.mark.parametrize("processes", PROCESSES)
@pytest.mark.parametrize("shape", list(ROWS))
def test_the_examples_are_tokenize_rows(tokenizer, tmp_path, shape, processes):
    path = tmp_path / "train.jsonl"
    write(path, [ROWS[shape][0], "", *ROWS[shape][1:]])  # a blank line is skipped
    examples = load_examples(path, tokenizer, 256, "training_file", processes=processes)

    expected = [tokenize_row(parse_row(row), tokenizer) for row in ROWS[shape]]
    assert list(examples) == expected
    assert examples[2:5] == expected[2:5] and examples[::3] == expected[::3]
    assert examples.lengths.tolist() == [len(ex.input_ids) for ex in expected]
    assert only_the_file_is_left(path)  # the Arrow files are read through their memory maps


def test_a_missing_file_names_the_parameter(tokenizer, tmp_path):
    with pytest.raises(UserError) as error:
        load_examples(tmp_path / "gone.jsonl", tokenizer, 256, "validation_file")
    assert (error.value.code, error.value.param) == ("file_not_found", "validation_file")


def assert_fails(path, tokenizer, processes: int, code: str, message: str, max_seq_length: int = 256) -> None:
    with pytest.raises(UserError) as error:
        load_examples(path, tokenizer, max_seq_length, "training_file", processes=processes)
    assert (error.value.code, error.value.message, error.value.param) == (code, message, "training_file")
    assert only_the_file_is_left(path)


def test_a_malformed_line_is_named(tokenizer, tmp_path):
    path = tmp_path / "train.jsonl"
    write(path, [*ROWS["text"][:2], '{"text": ', *ROWS["text"][2:]])
    assert_fails(
        path,
        tokenizer,
        1,
        "invalid_file_format",
        "Line 3 of the training_file is malformed: not valid JSON (Expecting value at column 9)",
    )


def test_a_file_of_blank_lines_has_no_examples(tokenizer, tmp_path):
    path = tmp_path / "train.jsonl"
    write(path, ["", "  "])
    assert_fails(path, tokenizer, 1, "invalid_file_format", "The training_file has no examples.")


def too_long(tokenizer, line: int, max_seq_length: int) -> str:
    tokens = len(tokenize_row(parse_row(ROWS["chat"][line - 1]), tokenizer).input_ids)
    assert tokens > max_seq_length
    return (
        f"Line {line} of the training_file is {tokens} tokens long, more than "
        f"max_seq_length={max_seq_length}; shorten the example or raise max_seq_length."
    )


@pytest.mark.slow
def test_the_first_bad_line_is_named_whichever_process_tokenized_it(tokenizer, tmp_path):
    """Two processes take lines 1-4 and 5-8; whichever finds a bad line first, the first is named."""
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    max_seq_length = len(tokenize_row(parse_row(short), tokenizer).input_ids)
    path = tmp_path / "train.jsonl"
    write(path, [short] * 6 + [ROWS["chat"][6], short])
    message = too_long(tokenizer, 7, max_seq_length)
    assert_fails(path, tokenizer, 2, "sequence_too_long", message, max_seq_length)

    write(path, [short, ROWS["chat"][1]] + [short] * 4 + [ROWS["chat"][6], short])
    message = too_long(tokenizer, 2, max_seq_length)
    assert_fails(path, tokenizer, 2, "sequence_too_long", message, max_seq_length)


@pytest.mark.parametrize("processes", PROCESSES)
def test_a_row_with_nothing_to_learn_is_named(base_model_dir, tmp_path, processes):
    """A template that writes no message content leaves no answer token to train on."""
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant\n{% endif %}"
    )
    path = tmp_path / "train.jsonl"
    write(path, ROWS["chat"][:4])
    assert_fails(
        path,
        tokenizer,
        processes,
        "invalid_file_format",
        "Line 1 of the training_file has nothing to learn (no assistant or completion tokens).",
    )


def test_the_cache_goes_in_the_jobs_dir_whose_temps_a_new_attempt_removes(tokenizer, tmp_path, monkeypatch):
    path = tmp_path / "files" / "train.jsonl"
    path.parent.mkdir()
    write(path, ROWS["text"])
    job_dir = tmp_path / "jobs" / "ftjob-1"
    seen = []
    original = tempfile.TemporaryDirectory

    def spy(*args, **kwargs):
        seen.append(Path(kwargs["dir"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryDirectory", spy)
    assert len(load_examples(path, tokenizer, 256, "training_file", job_dir)) == len(ROWS["text"])
    assert seen == [job_dir] and list(job_dir.iterdir()) == [] and only_the_file_is_left(path)
    # What a worker killed while tokenizing leaves there is one of the job's temps.
    (job_dir / ".tmp-tokenized-left").mkdir()
    remove_stale_temps(job_dir)
    assert list(job_dir.iterdir()) == []
