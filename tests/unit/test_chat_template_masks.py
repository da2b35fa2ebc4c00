"""Assistant-only loss masks under each family's real chat template: the labels keep exactly the
answers (and the token that ends each turn) and mask everything else, for multi-turn conversations
with a system message, and the last answer is trained in the context inference gives it."""

import json

import pytest

from app.core.training_rows import parse_row
from tests.chat_template_support import CHAT_TEMPLATES, family_tokenizer
from worker.data import IGNORE_INDEX, Example, load_examples, tokenize_row
from worker.errors import UserError

SYSTEM = {"role": "system", "content": "Answer in one word."}
TURNS = [
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
    {"role": "user", "content": "And of Spain?"},
    {"role": "assistant", "content": "Madrid, of course."},
]


def learned(example: Example, tokenizer) -> list[str]:
    """The text of each run of labelled tokens."""
    runs, run = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs + [tokenizer.decode(run)] * bool(run)


@pytest.mark.parametrize("family", list(CHAT_TEMPLATES))
def test_labels_are_exactly_the_answers_and_their_end_of_turn(base_model_dir, family):
    spec = CHAT_TEMPLATES[family]
    tokenizer = family_tokenizer(base_model_dir, family)
    messages = [SYSTEM, *TURNS] if spec.system else TURNS
    example = tokenize_row(parse_row({"messages": messages}), tokenizer)

    # Mistral's template writes a space before the answer, which its first token carries.
    lead = " " if family == "mistral" else ""
    answers = [m["content"] for m in TURNS if m["role"] == "assistant"]
    assert learned(example, tokenizer) == [lead + answer + spec.end_of_turn for answer in answers]
    # The last answer follows what inference renders for the conversation before it (Mistral's
    # system message is in the last user turn, which the full rendering would have dropped).
    context = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(example.input_ids).startswith(context)
    assert all(m["content"] in context for m in messages[:-1])


def test_qwen3_learns_the_last_answers_reasoning_and_not_the_dropped_ones(base_model_dir):
    """Qwen3's template keeps only the last answer's <think> block; earlier answers lose theirs, so
    rendering a prefix of the conversation does not give a prefix of its rendering."""
    tokenizer = family_tokenizer(base_model_dir, "qwen3")
    messages = [
        SYSTEM,
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\nParis."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "<think>\nAlso easy.\n</think>\n\nRome."},
    ]
    example = tokenize_row(parse_row({"messages": messages}), tokenizer)
    assert learned(example, tokenizer) == ["Paris.<|im_end|>", "Also easy.\n</think>\n\nRome.<|im_end|>"]
    assert "Easy." not in tokenizer.decode(example.input_ids)


@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_row_the_chat_template_refuses_fails_naming_the_line(base_model_dir, tmp_path, processes):
    """Gemma 2's template has no system role: the job fails as a user error, not mid-way, also when
    the row is tokenized by another process than the first."""
    tokenizer = family_tokenizer(base_model_dir, "gemma2")
    path = tmp_path / "train.jsonl"
    rows = [{"messages": TURNS[:2]}, {"messages": [SYSTEM, *TURNS[:2]]}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(UserError, match="Line 2 of the training_file.*System role not supported") as error:
        load_examples(path, tokenizer, 256, "training_file", processes=processes)
    assert error.value.code == "invalid_file_format"
