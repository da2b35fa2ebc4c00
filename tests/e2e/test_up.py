"""`tuneforge up` (what `make run` calls) supervises the API and a worker and stops both on SIGTERM."""

import os
import signal
import subprocess
import time

import httpx

from tests.conftest import REPO, free_port, link_base_model


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_up_runs_api_and_worker_and_sigterm_stops_both(tmp_path, base_model_dir):
    data_dir = tmp_path / "data"
    link_base_model(data_dir, base_model_dir)
    port = free_port()
    env = {
        **os.environ,
        "TUNEFORGE_DATA_DIR": str(data_dir),
        "TUNEFORGE_PORT": str(port),
        "TUNEFORGE_DEVICE": "cpu",
    }
    env.pop("TUNEFORGE_DATABASE_URL", None)
    log = open(tmp_path / "up.log", "w+")
    up = subprocess.Popen(
        [str(REPO / ".venv/bin/tuneforge"), "up"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "API did not come up"
            time.sleep(0.3)
        # The SQLite database was migrated in the default place under the data dir.
        assert (data_dir / "tuneforge.db").exists()
        kids = children_of(up.pid)
        assert len(kids) == 2, kids
        time.sleep(2)
        assert all(alive(k) for k in kids), "api and worker both keep running"

        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=90) == 0, (tmp_path / "up.log").read_text()
        assert not any(alive(k) for k in kids)
    finally:
        if up.poll() is None:
            up.kill()
        log.close()
