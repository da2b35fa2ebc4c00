"""Helpers for the worker's tests: tenants, files and jobs inserted straight through the ORM (as
the API would), the environment for worker subprocesses, and polling."""

import json
import os
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import select

from app.core.db import session_scope
from app.core.hyperparameters import TrainingHyperparameters
from app.core.settings import EMBEDDED_BASE_MODEL, Settings
from app.models import File, Job, JobEvent, Tenant, new_id
from worker.data import IGNORE_INDEX, Example

REPO = Path(__file__).resolve().parent.parent


def random_examples(n: int, vocab: int, min_length: int = 8) -> list[Example]:
    """Prompt/completion-like examples of random tokens: loss only on each example's tail."""
    rnd = random.Random(0)
    out = []
    for _ in range(n):
        length, prompt = rnd.randint(min_length, 30), rnd.randint(2, 6)
        ids = [rnd.randrange(3, vocab) for _ in range(length)]
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


HYPERPARAMETERS = {
    "n_epochs": 1,
    "batch_size": 1,
    "learning_rate_multiplier": 1.0,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "target_modules": "all-linear",
    "max_seq_length": 256,
    "packing": False,
}


def create_tenant(name: str = "acme") -> str:
    with session_scope() as session:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
        return tenant.id


def create_file(settings: Settings, tenant_id: str, rows: list, file_format: str = "chat") -> str:
    """`rows` are dicts (written as JSON) or raw strings (written as they are, to make bad lines)."""
    file_id = new_id("file")
    settings.files_dir.mkdir(parents=True, exist_ok=True)
    content = "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    (settings.files_dir / f"{file_id}.jsonl").write_text(content)
    with session_scope() as session:
        session.add(
            File(
                id=file_id,
                tenant_id=tenant_id,
                filename="train.jsonl",
                purpose="fine-tune",
                bytes=len(content),
                sha256="0" * 64,
                format=file_format,
                examples=len(rows),
            )
        )
    return file_id


def create_job(
    tenant_id: str, training_file: str, validation_file: str | None = None, seed: int = 42, **hyperparameters
) -> str:
    job_id = new_id("ftjob")
    with session_scope() as session:
        session.add(
            Job(
                id=job_id,
                tenant_id=tenant_id,
                model=EMBEDDED_BASE_MODEL,
                training_file=training_file,
                validation_file=validation_file,
                seed=seed,
                # Not validated, so that a test can record a value the API would refuse.
                hyperparameters=TrainingHyperparameters.model_construct(
                    **{**HYPERPARAMETERS, **hyperparameters}
                ).model_dump(),
                output_model=f"ft:{EMBEDDED_BASE_MODEL}:acme::{job_id}",
            )
        )
    return job_id


def get_job(job_id: str) -> Job:
    with session_scope() as session:
        return session.get(Job, job_id)


def update_job(job_id: str, **values) -> None:
    with session_scope() as session:
        job = session.get(Job, job_id)
        for name, value in values.items():
            setattr(job, name, value)


def events(job_id: str) -> list[JobEvent]:
    with session_scope() as session:
        return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def metric_steps(job_id: str) -> list[int]:
    return [e.data["step"] for e in events(job_id) if e.data and "train_loss" in e.data]


def wait_for(
    predicate: Callable[[], object], timeout: float, message: str = "condition", interval: float = 0.1
):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")


def worker_env(**overrides) -> dict:
    """The test's environment (TUNEFORGE_* set by the settings fixture) plus overrides."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", **{k: str(v) for k, v in overrides.items()}}


@contextmanager
def worker_thread(settings: Settings, **overrides) -> Iterator[threading.Event]:
    """run_worker in a thread of the test process; stopped (like SIGTERM) on exit."""
    from worker.loop import run_worker

    stop = threading.Event()
    thread = threading.Thread(
        target=run_worker, args=(settings.model_copy(update=overrides), stop), daemon=True
    )
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(timeout=120)
        assert not thread.is_alive(), "the worker did not stop"


def start_worker_process(log_path: Path, **env) -> subprocess.Popen:
    """`python -m worker` with the test's settings plus TUNEFORGE_* overrides."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [str(REPO / ".venv" / "bin" / "python"), "-m", "worker"],
            cwd=REPO,
            env=worker_env(**env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def quick_lease(**env) -> dict:
    """Worker settings for tests: short lease and heartbeat, fast polling."""
    return {
        "TUNEFORGE_LEASE_SECONDS": 3,
        "TUNEFORGE_HEARTBEAT_SECONDS": 0.3,
        "TUNEFORGE_POLL_SECONDS": 0.2,
        **env,
    }


ARITHMETIC = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(1, 5) for b in range(1, 5)]


class RecordingHooks:
    """TrainingHooks that keep events in a list and checkpoints in a directory, one per step (a later
    run's checkpoint at a step replaces an earlier run's)."""

    def __init__(self, checkpoints_dir):
        self.claimed_at = time.monotonic()
        self.checkpoints_dir = checkpoints_dir
        self.events: list[tuple[str, dict]] = []

    def control(self):
        return "continue"

    def log(self, message: str, data: dict) -> None:
        self.events.append((message, data))

    def record_hyperparameters(self, hyperparameters: dict, message: str, data: dict) -> None:
        self.events.append((message, data))

    def save_checkpoint(self, step, write, metrics) -> None:
        directory = self.checkpoints_dir / f"step-{step}"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        write(directory)

    def messages(self) -> list[str]:
        return [message for message, data in self.events if "load_seconds" not in data]

    def metrics(self, name: str) -> list[tuple[int, float]]:
        return [(data["step"], data[name]) for _, data in self.events if name in data]
