"""A slow adapter load (slowed on purpose through the loader's test hook) never stalls requests
for adapters that are already resident."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from app.core.migrate import upgrade
from app.core.settings import EMBEDDED_BASE_MODEL, Settings
from app.inference.adapters import LOAD_DELAY_ENV
from tests.conftest import link_base_model, running_api
from tests.inference_support import create_test_key, publish_test_adapter

LOAD_DELAY_S = 6.0
RESIDENT = f"ft:{EMBEDDED_BASE_MODEL}:acme:resident"
COLD = f"ft:{EMBEDDED_BASE_MODEL}:acme:cold"


def test_requests_for_a_resident_adapter_keep_streaming_while_another_loads(tmp_path, base_model_dir):
    data_dir = tmp_path / "data"
    link_base_model(data_dir, base_model_dir)
    env = {
        "TUNEFORGE_DATA_DIR": str(data_dir),
        "TUNEFORGE_DATABASE_URL": f"sqlite:///{data_dir / 'tuneforge.db'}",
        "TUNEFORGE_DEVICE": "cpu",
        LOAD_DELAY_ENV: str(LOAD_DELAY_S),
    }
    settings = Settings(data_dir=data_dir, database_url=env["TUNEFORGE_DATABASE_URL"], device="cpu")
    upgrade(settings.resolved_database_url)
    key = create_test_key(settings, "acme")
    publish_test_adapter(settings, "acme", RESIDENT, 1)
    publish_test_adapter(settings, "acme", COLD, 2)
    headers = {"Authorization": f"Bearer {key}"}

    def body(model, max_tokens):
        return {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0}

    with running_api(env) as url:
        # First use loads RESIDENT (slowly); from then on it sits in a pool slot.
        warm = httpx.post(f"{url}/v1/completions", json=body(RESIDENT, 2), headers=headers, timeout=60)
        assert warm.status_code == 200, warm.text

        def cold_request():
            response = httpx.post(f"{url}/v1/completions", json=body(COLD, 2), headers=headers, timeout=60)
            return response, time.monotonic()

        with ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            cold = pool.submit(cold_request)
            time.sleep(0.3)
            chunk_times = []
            with httpx.stream(
                "POST",
                f"{url}/v1/completions",
                json={**body(RESIDENT, 12), "stream": True},
                headers=headers,
                timeout=60,
            ) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        assert "error" not in json.loads(line[6:])
                        chunk_times.append(time.monotonic())
            cold_response, cold_done = cold.result()
        assert cold_response.status_code == 200, cold_response.text
        # The resident adapter streamed all its tokens while the other one was still loading.
        assert len(chunk_times) >= 6
        assert chunk_times[-1] < cold_done
        assert chunk_times[-1] - started < LOAD_DELAY_S
