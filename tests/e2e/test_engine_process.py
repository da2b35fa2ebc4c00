"""The inference engine runs in a process of its own beside `tuneforge api`: killed with SIGKILL,
its requests fail with a 503 error instead of hanging, /readyz reports it restarting, and a new
engine process serves the same greedy answers; killing the API process takes the engine with it."""

import json
import os
import signal
import time
from pathlib import Path

import httpx

from app.core.migrate import upgrade
from app.core.settings import EMBEDDED_BASE_MODEL, Settings
from tests.conftest import link_base_model, running_api
from tests.inference_support import create_test_key

BODY = {
    "model": EMBEDDED_BASE_MODEL,
    "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
    "temperature": 0,
    "max_tokens": 12,
}


def _engine_pids(data_dir: Path) -> list[int]:
    """The engine processes (multiprocessing spawns) of the server whose data dir is `data_dir`."""
    wanted = f"TUNEFORGE_DATA_DIR={data_dir}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"spawn_main" in cmdline and wanted in environ:
            pids.append(int(proc.name))
    return pids


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _readiness(url: str) -> tuple[int, dict]:
    response = httpx.get(f"{url}/readyz", timeout=10)
    return response.status_code, response.json()


def test_a_killed_engine_process_fails_its_requests_then_serves_again(tmp_path, base_model_dir):
    data_dir = tmp_path / "data"
    link_base_model(data_dir, base_model_dir)
    db = f"sqlite:///{data_dir / 'tuneforge.db'}"
    settings = Settings(data_dir=data_dir, database_url=db, device="cpu")
    upgrade(settings.resolved_database_url)
    headers = {"Authorization": f"Bearer {create_test_key(settings, 'acme')}"}
    env = {"TUNEFORGE_DATA_DIR": str(data_dir), "TUNEFORGE_DATABASE_URL": db, "TUNEFORGE_DEVICE": "cpu"}
    check = f"engine:{EMBEDDED_BASE_MODEL}"

    with running_api(env) as url:
        before = httpx.post(f"{url}/v1/chat/completions", json=BODY, headers=headers, timeout=120)
        assert before.status_code == 200, before.text
        (engine,) = _engine_pids(data_dir)

        # A long streamed answer is under way when the engine process is killed.
        lines = []
        long = {**BODY, "max_tokens": 2000, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=long, headers=headers, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line.removeprefix("data: "))
                if len(lines) == 3:
                    os.kill(engine, signal.SIGKILL)
        assert lines[-1] == "[DONE]"
        error = json.loads(lines[-2])["error"]
        assert error["type"] == "server_error" and "stopped" in error["message"], error

        status, body = _readiness(url)
        assert status == 503 and body["checks"][check] == "restarting", body
        refused = httpx.post(f"{url}/v1/chat/completions", json=BODY, headers=headers, timeout=120)
        assert refused.status_code == 503 and "restarting" in refused.json()["error"]["message"]

        deadline = time.monotonic() + 120
        while _readiness(url)[0] != 200:
            assert time.monotonic() < deadline, "the engine did not come back in 120 s"
            time.sleep(0.5)
        after = httpx.post(f"{url}/v1/chat/completions", json=BODY, headers=headers, timeout=120)
        assert after.status_code == 200, after.text
        assert after.json()["choices"][0]["message"] == before.json()["choices"][0]["message"]
        (restarted,) = _engine_pids(data_dir)
        assert restarted != engine

        # The API process killed outright: its engine process notices and exits, freeing the GPU.
        os.kill(_parent(restarted), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _alive(restarted):
            assert time.monotonic() < deadline, "the engine process outlived the API process"
            time.sleep(0.2)
