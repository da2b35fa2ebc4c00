"""The OpenAPI document tells the truth: a bounded schemathesis run over every operation of a real
`tuneforge api` (SQLite, a real key, seeded objects) passes all of its default checks, no 5xx.
`make fuzz` runs the same with many more examples (tests/openapi_fuzz.py)."""

import httpx
import pytest

from tests.openapi_fuzz import run_schemathesis, seeded_api

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(tmp_path_factory, base_model_dir):
    with seeded_api(tmp_path_factory.mktemp("fuzz"), base_model_dir) as (url, env):
        yield url, env


def test_undeclared_methods_answer_405_with_allow(api):
    url, env = api
    headers = {"Authorization": f"Bearer {env['TUNEFORGE_FUZZ_KEY']}"}
    files = httpx.request("TRACE", f"{url}/v1/files", headers=headers)
    model = httpx.request("PUT", f"{url}/v1/models/some-model", headers=headers)
    health = httpx.request("DELETE", f"{url}/healthz")
    assert files.status_code == model.status_code == health.status_code == 405
    assert files.headers["allow"] == "GET, POST"
    assert model.headers["allow"] == "DELETE, GET"
    assert health.headers["allow"] == "GET"
    assert files.json()["error"]["code"] == "method_not_allowed"


def test_no_operation_documents_fastapis_unused_422(api):
    url, _ = api
    document = httpx.get(f"{url}/openapi.json").json()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (method, path)
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_schemathesis_finds_nothing(api):
    url, env = api
    # A fixed seed keeps this run repeatable; `make fuzz` draws a new one each time.
    result = run_schemathesis(url, env, "--max-examples", "10", "--seed", "1", timeout=420)
    assert result.returncode == 0, result.stdout[-20_000:]
    assert "22 selected / 22 total" in result.stdout
