"""Upload validation of a big training file: throughput and the API process's memory.

python3 bench/upload.py [--size-mb 1024] [--formats prompt_completion,chat]
Needs no GPU. For each format, writes a JSONL of about --size-mb MB (rows of ~1 KB of random words,
some of them non-ASCII: ~a million rows for 1 GB), starts a real `tuneforge api` on the CPU (SQLite in a
temp data dir; its engine loads the embedded base, materialised once into a cache shared between runs),
and uploads the file to POST /v1/files with httpx, which streams it from disk in 64 KiB chunks. The
answer comes once every line is validated, so the time from sending the first byte to the answer is
upload + validation; the time after the last byte is sent is what the API does once it has the body.
Memory: the API process's VmRSS sampled every 10 ms from /proc/<pid>/status during the upload, and its
VmHWM (peak), reset to the current RSS just before the upload by writing 5 to /proc/<pid>/clear_refs;
growth = peak - RSS before. The issue's target: ≤ 300 MB growth for a 1 GB file.
Writes docs/benchmarks/upload_cpu.json (section "upload").
"""

import argparse
import io
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._processes import api_ready, cli, start, stop, wait_until  # noqa: E402
from bench._results import LATEST, merge  # noqa: E402

# The embedded base is materialised (~30 s) under the data dir; this keeps it between runs.
BASES = Path(tempfile.gettempdir()) / "tf-bench-base-models"
MB = 10**6


def word_pool(rnd: random.Random, n=20_000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    # Some non-ASCII words so that the validator's UTF-8 decoding sees multi-byte text.
    extra = ["café", "naïve", "Straße", "東京", "данные", "🙂"]
    return ["".join(rnd.choices(letters, k=rnd.randint(2, 9))) for _ in range(n - len(extra))] + extra


def write_jsonl(path: Path, size: int, fmt: str, seed=0) -> int:
    """Rows of ~1 KB until the file holds `size` bytes; returns the number of rows."""
    rnd = random.Random(seed)
    words = word_pool(rnd)

    def text(n_words):
        return " ".join(rnd.choices(words, k=n_words))

    rows, written = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size:
            if fmt == "chat":
                row = {
                    "messages": [
                        {"role": "system", "content": text(12)},
                        {"role": "user", "content": text(rnd.randint(20, 60))},
                        {"role": "assistant", "content": text(rnd.randint(60, 140))},
                    ]
                }
            else:
                row = {"prompt": text(rnd.randint(25, 75)), "completion": text(rnd.randint(70, 150))}
            line = json.dumps(row, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode())
            rows += 1
    return rows


class TimedFile(io.FileIO):
    """A file whose reads note when the last byte was handed to httpx."""

    sent_at = None

    def read(self, size=-1):
        chunk = super().read(size)
        if not chunk:
            self.sent_at = self.sent_at or time.perf_counter()
        return chunk


def status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def sample_rss(pid: int, stop: threading.Event, peak: list[int]) -> None:
    while not stop.wait(0.01):
        peak[0] = max(peak[0], status(pid)["VmRSS"])


def measure(path: Path, fmt: str, env: dict, port: int, log: Path) -> dict:
    env = {**env, "TUNEFORGE_PORT": str(port)}
    key = cli(env, "keys", "create", "--tenant", "bench").strip().splitlines()[-1]
    procs = {"api": start("api", env, log)}
    proc = procs["api"][0]
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: api_ready(url), procs, "tuneforge api", timeout=300)
        time.sleep(2)  # let the engine's start-up allocations settle before the baseline
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = status(proc.pid)["VmRSS"]
        peak, uploaded = [before], threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(proc.pid, uploaded, peak))
        sampler.start()
        client_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        size = path.stat().st_size
        with TimedFile(path) as f, httpx.Client(base_url=url, timeout=None) as client:
            t0 = time.perf_counter()
            response = client.post(
                "/v1/files",
                headers={"Authorization": f"Bearer {key}"},
                files={"file": (path.name, f, "application/jsonl")},
                data={"purpose": "fine-tune"},
            )
            t1 = time.perf_counter()
        uploaded.set()
        sampler.join()
        after = status(proc.pid)
        if response.status_code != 200:
            raise RuntimeError(f"upload failed: {response.status_code} {response.text[:500]}")
        body = response.json()
        peak_rss = max(peak[0], after["VmHWM"])
        return {
            "bytes": size,
            "examples": body["examples"],
            "format": fmt,
            "seconds": round(t1 - t0, 2),
            "mb_per_s": round(size / MB / (t1 - t0), 1),
            "seconds_after_last_byte_sent": round(t1 - f.sent_at, 2),
            "api_rss_before_mb": round(before / MB, 1),
            "api_rss_peak_mb": round(peak_rss / MB, 1),
            "api_rss_growth_mb": round((peak_rss - before) / MB, 1),
            "api_rss_after_mb": round(after["VmRSS"] / MB, 1),
            "client_maxrss_growth_mb": round(
                (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - client_before) / MB, 1
            ),
        }
    finally:
        stop(procs, timeout=30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=1024, help="size of each file, in MB (10^6 bytes)")
    ap.add_argument("--formats", default="prompt_completion,chat")
    ap.add_argument("--port", type=int, default=8768)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tf-upload-"))
    data_dir = work / "data"
    data_dir.mkdir()
    BASES.mkdir(exist_ok=True)
    (data_dir / "base_models").symlink_to(BASES)
    env = dict(
        os.environ,
        TUNEFORGE_DATA_DIR=str(data_dir),
        TUNEFORGE_DEVICE="cpu",
        # Room for any --size-mb; the limit is not what is measured here.
        TUNEFORGE_MAX_UPLOAD_BYTES=str(2 * a.size_mb * MB),
        PYTHONPATH=os.pathsep.join([str(ROOT), *[p for p in [os.environ.get("PYTHONPATH")] if p]]),
    )
    results = {}
    try:
        for fmt in a.formats.split(","):
            path = work / f"{fmt}.jsonl"
            t = time.perf_counter()
            rows = write_jsonl(path, a.size_mb * MB, fmt)
            print(f"wrote {path} ({rows} rows) in {time.perf_counter() - t:.0f} s", flush=True)
            results[fmt] = measure(path, fmt, env, a.port, work / f"api-{fmt}.log")
            print(fmt, json.dumps(results[fmt]), flush=True)
            path.unlink()  # the next file needs the disk, and the API's stored copy is in data_dir
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = "python3 bench/upload.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v != ap.get_default(k)
    )
    merge(
        "upload",
        {"command": command, "cpus": os.cpu_count(), "size_mb": a.size_mb, **results},
        path=LATEST.parent / "upload_cpu.json",
    )


if __name__ == "__main__":
    main()
