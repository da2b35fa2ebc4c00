"""Schemathesis hooks for the OpenAPI fuzz (tests/openapi_fuzz.py): what JSON Schema cannot say.

- A schema-valid case is still refused where validity depends on data or state: an upload's lines
  must be training examples, a job names an uploaded file and a served base model. Positive cases
  get such values (the seeded file, the base model), so that they reach the code past validation.
- Inference cases name the served models some of the time, so that generation runs, and generate
  a few tokens at most: the schema states no maximum because the server enforces none (the limit
  is the context window, which depends on the prompt).
- The seeded file and fine-tune are never deleted, so that later cases can rely on them.

The seeded ids come from the environment that tests/openapi_fuzz.py sets."""

import os

import schemathesis

FILE_ID = os.environ["TUNEFORGE_FUZZ_FILE_ID"]
BASE_MODEL, FINE_TUNE = os.environ["TUNEFORGE_FUZZ_MODELS"].split(",")
MAX_TOKENS = 4
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "max_new_tokens")
# The field each endpoint reads when the others are missing; it defaults to up to the whole context.
DEFAULT_LENGTH_FIELD = {
    "/v1/chat/completions": "max_tokens",
    "/v1/completions": "max_tokens",
    "/generate": "max_new_tokens",
}
TRAINING_FILES = [
    b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n',
    b'{"prompt": "2+2=", "completion": "4"}\n{"prompt": "3+3=", "completion": "6"}\n',
    b'{"text": "Tuneforge fine-tunes small models."}\n',
]


def _positive(case) -> bool:
    return case.meta is None or case.meta.generation.mode.is_positive


def _pick(case, choices: list):
    # Deterministic for a given case, so that Hypothesis can replay and shrink it.
    return choices[len(repr(case.body)) % len(choices)]


@schemathesis.hook
def map_case(context, case):
    path, method = case.operation.path, case.method.upper()
    body = case.body if isinstance(case.body, dict) else None
    if path in DEFAULT_LENGTH_FIELD and body is not None:
        for name in LENGTH_FIELDS:
            value = body.get(name)
            # JSON Schema's integers include 5.0.
            if isinstance(value, int | float) and not isinstance(value, bool) and value > MAX_TOKENS:
                body[name] = MAX_TOKENS
        if body.get(DEFAULT_LENGTH_FIELD[path]) is None and body.get("max_completion_tokens") is None:
            body[DEFAULT_LENGTH_FIELD[path]] = MAX_TOKENS
        if _positive(case):
            body["model"] = _pick(case, [BASE_MODEL, FINE_TUNE, body.get("model")])
    if not _positive(case) or body is None or method != "POST":
        return case
    if path == "/v1/files":
        body["file"] = _pick(case, TRAINING_FILES)
    elif path == "/v1/fine_tuning/jobs":
        body["model"], body["training_file"] = BASE_MODEL, FILE_ID
        if body.get("validation_file") is not None:
            body["validation_file"] = FILE_ID
    return case


@schemathesis.hook
def filter_case(context, case):
    if case.method.upper() != "DELETE":
        return True
    return not {FILE_ID, FINE_TUNE} & {str(v) for v in case.path_parameters.values()}
