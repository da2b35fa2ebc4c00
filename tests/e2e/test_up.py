"""`tuneforge up` (what `make run` calls) supervises the API and a worker and stops both on SIGTERM."""

import os
import signal
import subprocess
import time
from contextlib import contextmanager

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


@contextmanager
def running_up(tmp_path, base_model_dir):
    """`tuneforge up` on a fresh data dir, once its API answers; yields (process, data dir, log)."""
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
    log_path = tmp_path / "up.log"
    with open(log_path, "w+") as log:
        up = subprocess.Popen(
            [str(REPO / ".venv/bin/tuneforge"), "up"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                assert up.poll() is None, log_path.read_text()
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "API did not come up"
                time.sleep(0.3)
            yield up, data_dir, log_path
        finally:
            if up.poll() is None:
                up.kill()


def test_up_runs_api_and_worker_and_sigterm_stops_both(tmp_path, base_model_dir):
    with running_up(tmp_path, base_model_dir) as (up, data_dir, log_path):
        # The SQLite database was migrated in the default place under the data dir.
        assert (data_dir / "tuneforge.db").exists()
        kids = children_of(up.pid)
        assert len(kids) == 2, kids
        time.sleep(2)
        assert all(alive(k) for k in kids), "api and worker both keep running"

        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=90) == 0, log_path.read_text()
        assert not any(alive(k) for k in kids)


def test_up_stops_the_other_child_and_fails_when_one_dies(tmp_path, base_model_dir):
    with running_up(tmp_path, base_model_dir) as (up, _data_dir, log_path):
        kids = children_of(up.pid)
        assert len(kids) == 2, kids
        os.kill(kids[0], signal.SIGKILL)
        assert up.wait(timeout=90) == 1, log_path.read_text()
        assert not any(alive(k) for k in kids)
        assert "exited on its own" in log_path.read_text()
