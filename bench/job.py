"""Training jobs as a user runs them: a real `tuneforge api` and `tuneforge worker`, a file uploaded
and jobs created over HTTP, timed from created to succeeded.

python3 bench/job.py [--model-shape tinyllama|mistral7b|qwen3] [--examples 3000] [--device cuda|cpu]
python3 bench/job.py --big-file-mb 1000
Builds the shape's random checkpoint (bench/shapes.py) with bench/serve.py's word-level tokenizer,
writes a prompt/completion JSONL of bench/train.py's synthetic lengths (median ~134 tokens) as text of
the tokenizer's words, and runs the API and one worker as subprocesses on a temp data dir (SQLite),
the checkpoint registered in TUNEFORGE_BASE_MODELS and served by the API as well. Two jobs, one after
the other on the same worker: `batch_size` 128 and `n_epochs` 1 (the worker's first job: it loads the
base), then default hyperparameters except `n_epochs` 1 (the second). Per job:
  end to end:  trained_tokens / (succeeded - created) on the client's clock (the job's created_at and
               finished_at are whole seconds; their figure is reported beside it);
  job's own:   tokens/s from its metrics events (each event's tokens_per_second covers the steps since
               the previous one; they exclude loading the base and tokenizing);
  job start:   claim -> end of the first optimizer step: `since_claim_s` in the first metrics event's
               data when the worker records it, otherwise the client's clock from seeing the job running
               to seeing its first metrics event (which comes after step LOG_EVERY_STEPS, not step 1).
Results merged into docs/benchmarks/latest.json under "train" (`default_job{suffix}_tokens_per_s`,
`batch128_job{suffix}_tokens_per_s`, `job_start{suffix}_s` for the second job and
`job_start_first{suffix}_s` for the first; suffix from RESULT_KEYS: "" for the 1.1B shape,
"_7b", "_qwen3") and the details under `train.jobs{suffix}`. `--device cpu` runs a tiny random Llama
instead of the shape, to check the script on a machine without a GPU; it prints and merges nothing.

--big-file-mb N instead: a file of N MB (10^6 bytes) of such rows, about 1.5 million for 1,000, uploaded
(timed: the API validates it as it arrives), then one job at default hyperparameters, timed from its
claim to the end of its first optimizer step (the worker tokenizes the whole file first), then
cancelled. Merged under "train" as `big_file_job_start_s` and `big_file`.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._processes import api_ready, cli, start, stop, wait_until  # noqa: E402
from bench._results import merge  # noqa: E402
from bench.serve import ensure_tokenizer  # noqa: E402
from bench.shapes import RESULT_KEYS, SHAPES, build_checkpoint  # noqa: E402
from bench.train import synthetic_examples  # noqa: E402

POLL_S = 0.1
# In this order on one worker: the first job loads the base, the second finds it resident if the
# worker keeps it (warm workers), as the default-hyperparameter job of a user on a busy service would.
JOBS = {
    "batch128": {"n_epochs": 1, "batch_size": 128},
    "default": {"n_epochs": 1},
}


def write_examples(path: Path, n: int, vocab: int) -> int:
    """n prompt/completion rows; returns their token count. Each of bench/train.py's examples of L ids
    becomes L - 1 words (the worker appends the end-of-sequence token), the first third the prompt.
    The prompt ends in a space so that prompt + completion splits into the same words."""
    tokens = 0
    with open(path, "w") as f:
        for ids in synthetic_examples(n):
            words = [str(3 + (i - 3) % (vocab - 3)) for i in ids[:-1]]  # the identity for the 32k vocab
            f.write(json.dumps(_prompt_completion(words)) + "\n")
            tokens += len(ids)
    return tokens


def _prompt_completion(words: list[str]) -> dict:
    cut = len(words) // 3
    return {"prompt": " ".join(words[:cut]) + " ", "completion": " ".join(words[cut:])}


def write_big_file(path: Path, megabytes: int, vocab: int) -> int:
    """Rows as write_examples writes them (numpy-drawn, for speed) until the file holds `megabytes`
    MB; returns how many."""
    rng = np.random.default_rng(0)
    words = np.array([str(i) for i in range(vocab)])
    written = rows = 0
    with open(path, "w") as f:
        while written < megabytes * 10**6:
            lengths = np.clip(rng.lognormal(4.9, 0.6, 1000).astype(int), 24, 512) - 1
            drawn = np.split(words[rng.integers(3, vocab, lengths.sum())], np.cumsum(lengths)[:-1])
            lines = [json.dumps(_prompt_completion(list(w))) for w in drawn]
            text = "\n".join(lines) + "\n"
            f.write(text)
            written, rows = written + len(text), rows + len(lines)
    return rows


def big_file_start(client: httpx.Client, model: str, path: Path, timeout: float) -> dict:
    """Upload `path`, start a default job on it, and time its claim -> first step; then cancel it."""
    started = time.time()
    with open(path, "rb") as f:
        file_id = ok(client.post("/v1/files", files={"file": f}, data={"purpose": "fine-tune"}))["id"]
    upload_s = time.time() - started
    print(f"uploaded in {upload_s:.0f} s", flush=True)
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}}
    job = ok(
        client.post("/v1/fine_tuning/jobs", json={"model": model, "training_file": file_id, "method": method})
    )
    created, claimed = time.time(), None
    while True:
        if time.time() - created > timeout:
            raise RuntimeError(f"job {job['id']} took no step in {timeout:.0f} s")
        page = ok(client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 20}))
        first = [e for e in page["data"] if (e.get("data") or {}).get("since_claim_s") is not None]
        if first:
            break
        status = ok(client.get(f"/v1/fine_tuning/jobs/{job['id']}"))["status"]
        if status == "running" and claimed is None:
            claimed = time.time()
            print(f"claimed {claimed - created:.0f} s after it was created", flush=True)
        if status in ("failed", "cancelled"):
            raise RuntimeError(f"job {job['id']} {status}")
        time.sleep(1)
    ok(client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel"))
    size = path.stat().st_size
    return {
        "file_bytes": size,
        "upload_s": round(upload_s, 1),
        "upload_mb_per_s": round(size / 1e6 / upload_s, 1),
        "job_start_s": first[0]["data"]["since_claim_s"],
        "created_to_first_step_s": round(time.time() - created, 1),
        "cpu_cores": os.cpu_count(),
    }


def events(client: httpx.Client, job_id: str) -> list[dict]:
    """All the job's events, oldest first (the API pages them newest first)."""
    out, after = [], None
    while True:
        params = {"limit": 100, **({"after": after} if after else {})}
        page = ok(client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params))
        out += page["data"]
        if not page["has_more"]:
            return out[::-1]
        after = page["data"][-1]["id"]


def ok(response: httpx.Response) -> dict:
    if response.status_code >= 400:
        raise RuntimeError(f"{response.request.method} {response.request.url}: {response.text[:1000]}")
    return response.json()


def run_job(client: httpx.Client, model: str, file_id: str, hyperparameters: dict, timeout: float) -> dict:
    method = {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
    created = time.time()
    job = ok(
        client.post("/v1/fine_tuning/jobs", json={"model": model, "training_file": file_id, "method": method})
    )
    seen_running = seen_step = None
    while job["status"] != "succeeded":
        if job["status"] in ("failed", "cancelled"):
            raise RuntimeError(f"job {job['id']} {job['status']}: {job.get('error')}")
        if time.time() - created > timeout:
            raise RuntimeError(f"job {job['id']} still {job['status']} after {timeout:.0f} s")
        time.sleep(POLL_S)
        job = ok(client.get(f"/v1/fine_tuning/jobs/{job['id']}"))
        now = time.time()
        if job["status"] != "queued" and seen_running is None:
            seen_running = now
        if seen_running is not None and seen_step is None:
            page = ok(client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 10}))
            if any(e["type"] == "metrics" for e in page["data"]):
                seen_step = now
    done = time.time()

    log = events(client, job["id"])
    metrics = [e for e in log if e["type"] == "metrics"]
    claimed = next(e for e in log if (e.get("data") or {}).get("attempt") == 1)
    first = metrics[0]
    # Each event's tokens_per_second covers the steps since the previous event; with about the same
    # tokens in every step, a window of n steps took n * tokens_per_step / tokens_per_second.
    tokens, steps = job["trained_tokens"], metrics[-1]["data"]["step"]
    bounds = [0] + [e["data"]["step"] for e in metrics]
    step_seconds = sum(
        (stop - start) * tokens / steps / e["data"]["tokens_per_second"]
        for start, stop, e in zip(bounds[:-1], bounds[1:], metrics, strict=True)
    )
    since_claim = first["data"].get("since_claim_s")
    result = {
        "id": job["id"],
        "hyperparameters": job["hyperparameters"],
        "trained_tokens": tokens,
        "steps": steps,
        "seconds": round(done - created, 2),
        "tokens_per_s": round(tokens / (done - created), 1),
        "tokens_per_s_from_job_timestamps": round(tokens / max(job["finished_at"] - job["created_at"], 1), 1),
        "job_events_tokens_per_s": round(tokens / step_seconds, 1),
        "first_metrics_step": first["data"]["step"],
        "queued_s": round(seen_running - created, 2),
    }
    if since_claim is not None:
        result.update(job_start_s=round(since_claim, 2), job_start_source="since_claim_s (worker, step 1)")
    else:
        result.update(
            job_start_s=round(seen_step - seen_running, 2),
            job_start_source=f"client clock, running seen -> step {first['data']['step']} metrics event seen",
            job_start_s_event_timestamps=first["created_at"] - claimed["created_at"],
        )
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-shape", choices=sorted(SHAPES), default="tinyllama")
    ap.add_argument("--examples", type=int, default=3000)
    ap.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a tiny model, nothing merged"
    )
    ap.add_argument("--port", type=int, default=8767)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds each job may take")
    ap.add_argument("--big-file-mb", type=int, help="time a job's start on a file of this many MB instead")
    a = ap.parse_args()
    shape = "tiny" if a.device == "cpu" else a.model_shape
    checkpoint, vocab = Path(build_checkpoint(shape)), SHAPES[shape][1]["vocab_size"]
    ensure_tokenizer(str(checkpoint), vocab)
    base = checkpoint.name
    data_dir = Path(tempfile.mkdtemp(prefix="tf-job-"))
    data = data_dir / "train.jsonl"
    if a.big_file_mb:
        started = time.time()
        rows = write_big_file(data, a.big_file_mb, vocab)
        print(f"wrote {rows} rows in {time.time() - started:.0f} s", flush=True)
    else:
        file_tokens = write_examples(data, a.examples, vocab)
    env = dict(
        os.environ,
        TUNEFORGE_DATA_DIR=str(data_dir),
        TUNEFORGE_BASE_MODELS=json.dumps({base: str(checkpoint)}),
        TUNEFORGE_SERVE_BASE_MODEL=base,
        TUNEFORGE_DEVICE=a.device,
        TUNEFORGE_PORT=str(a.port),
        PYTHONPATH=os.pathsep.join([str(ROOT), *[p for p in [os.environ.get("PYTHONPATH")] if p]]),
    )
    key = cli(env, "keys", "create", "--tenant", "bench").strip().splitlines()[-1]
    # Logs into $OUT (if set) so that they come back from the device even when a job fails.
    log_dir = Path(os.environ.get("OUT") or data_dir)
    procs = {name: start(name, env, log_dir / f"{name}.log") for name in ("api", "worker")}
    url = f"http://127.0.0.1:{a.port}"
    try:
        wait_until(lambda: api_ready(url), procs, "tuneforge api")
        wait_until(lambda: " started" in procs["worker"][1].read_text(), procs, "tuneforge worker")
        headers = {"Authorization": f"Bearer {key}"}
        if a.big_file_mb:
            with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
                big = {"rows": rows, **big_file_start(client, base, data, a.timeout)}
            print("big_file", json.dumps(big), flush=True)
            if a.device == "cuda":
                merge("train", {"big_file_job_start_s": big["job_start_s"], "big_file": big})
            return
        with httpx.Client(base_url=url, headers=headers, timeout=600) as client, open(data, "rb") as f:
            file_id = ok(client.post("/v1/files", files={"file": f}, data={"purpose": "fine-tune"}))["id"]
            jobs = {}
            for name, hyperparameters in JOBS.items():
                jobs[name] = run_job(client, base, file_id, hyperparameters, a.timeout)
                print(name, json.dumps(jobs[name]), flush=True)
    finally:
        stop(procs)
    suffix = RESULT_KEYS[a.model_shape]
    out = {
        f"default_job{suffix}_tokens_per_s": jobs["default"]["tokens_per_s"],
        f"batch128_job{suffix}_tokens_per_s": jobs["batch128"]["tokens_per_s"],
        f"job_start{suffix}_s": jobs["default"]["job_start_s"],
        f"job_start_first{suffix}_s": jobs["batch128"]["job_start_s"],
        f"jobs{suffix}": {"examples": a.examples, "file_tokens": file_tokens, **jobs},
    }
    print("result", json.dumps(out), flush=True)
    if a.device == "cuda":
        merge("train", out)


if __name__ == "__main__":
    main()
