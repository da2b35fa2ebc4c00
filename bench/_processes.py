"""`tuneforge` processes for the benchmarks that drive a real API (and worker): run a command, start
one with its output in a log file, wait until something is ready while watching that none has
exited, stop them."""

import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def cli(env: dict, *args) -> str:
    """`tuneforge ARGS` to completion (from the checkout $BENCH_APP_ROOT, else this one): its output."""
    r = subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=env.get("BENCH_APP_ROOT", str(ROOT)),
    )
    if r.returncode:
        raise RuntimeError(f"tuneforge {' '.join(args)} failed: {r.stderr[-2000:]}")
    return r.stdout


def start(command: str, env: dict, log: Path) -> tuple[subprocess.Popen, Path]:
    """`tuneforge COMMAND` (api, worker) from this checkout; its output goes to `log`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", command],
        env=env,
        cwd=ROOT,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    return proc, log


def wait_until(ready, procs: dict, what: str, timeout: float = 600) -> None:
    """Poll `ready()`; fail with the log's tail if one of `procs` (name -> (proc, log)) exits first."""
    deadline = time.time() + timeout
    while not ready():
        for name, (proc, log) in procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"tuneforge {name} exited ({proc.returncode}): {log.read_text()[-2000:]}")
        if time.time() > deadline:
            raise RuntimeError(f"{what} not ready in {timeout:.0f} s")
        time.sleep(0.5)


def api_ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def stop(procs: dict, timeout: float = 60) -> None:
    for proc, _ in procs.values():
        proc.terminate()
    for proc, _ in procs.values():
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
