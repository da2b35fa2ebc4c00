import json

import pytest

from app.core.errors import InvalidRequest
from app.services.files import validate_training_jsonl

CHAT = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def write(tmp_path, lines) -> "object":
    path = tmp_path / "f.jsonl"
    path.write_bytes(
        b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)
    )
    return path


@pytest.mark.parametrize(
    "example, fmt",
    [
        (CHAT, "chat"),
        ({"prompt": "2+2=", "completion": "4"}, "prompt_completion"),
        ({"text": "some prose"}, "text"),
    ],
)
def test_each_shape_is_recognised_and_counted(tmp_path, example, fmt):
    assert validate_training_jsonl(write(tmp_path, [example, b"", example])) == (fmt, 2)


@pytest.mark.parametrize(
    "bad, words",
    [
        (b"\xff\xfe", "line 2: is not UTF-8"),
        (b'{"messages": []}', "line 2: 'messages' must be a non-empty list"),
        (b'{"messages": [{"role": "user", "content": 3}]}', "line 2: messages[0].content must be a string"),
        (
            b'{"messages": [{"role": "user", "content": "only a question"}]}',
            "line 2: needs at least one assistant",
        ),
        (b'{"text": "mixed"}', "line 2: is in the text format but earlier lines are chat"),
        (b'"just a string"', "line 2: each line must be a JSON object"),
    ],
)
def test_first_bad_line_is_named_with_the_reason(tmp_path, bad, words):
    with pytest.raises(InvalidRequest) as err:
        validate_training_jsonl(write(tmp_path, [CHAT, bad, b"{broken"]))
    assert words in err.value.message
    assert err.value.param == "file"


def test_file_without_examples_is_refused(tmp_path):
    with pytest.raises(InvalidRequest, match="no examples"):
        validate_training_jsonl(write(tmp_path, [b"", b"  "]))
