"""Test hooks, switched on only by environment variables that the test suite sets:

- TUNEFORGE_TEST_RECIPE=noop: a recipe that trains nothing but goes through the same hooks,
  events and fenced publish path (for queue tests with hundreds of jobs).
- TUNEFORGE_TEST_NOOP_STEPS / TUNEFORGE_TEST_NOOP_STEP_SECONDS: its length;
  TUNEFORGE_TEST_NOOP_CHECKPOINT_EVERY=N: it also checkpoints every N steps.
- TUNEFORGE_TEST_INFRA_FAILURES=N: the first N attempts of every job fail with an InfraError.
- TUNEFORGE_TEST_CRASH_AT=<point>: the process dies (os._exit) at that point of publishing.
"""

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from app.core.artifacts import WEIGHTS_FILE
from worker.errors import InfraError
from worker.hooks import TrainingHooks, TrainResult


def _env(name: str, default: str = "") -> str:
    return os.environ.get(f"TUNEFORGE_TEST_{name}", default)


def noop_recipe_enabled() -> bool:
    return _env("RECIPE") == "noop"


def maybe_fail_infra(infra_failures: int) -> None:
    if infra_failures < int(_env("INFRA_FAILURES", "0")):
        raise InfraError("simulated infrastructure failure (TUNEFORGE_TEST_INFRA_FAILURES)")


def crash_point(name: str) -> None:
    if _env("CRASH_AT") == name:
        os._exit(70)


def train_noop(job_id: str, hooks: TrainingHooks, resume_from: Path | None) -> TrainResult:
    steps = int(_env("NOOP_STEPS", "2"))
    step_seconds = float(_env("NOOP_STEP_SECONDS", "0"))
    checkpoint_every = int(_env("NOOP_CHECKPOINT_EVERY", "0"))
    step = 0
    if resume_from is not None:
        step = json.loads((resume_from / "state" / "trainer_state.json").read_text())["step"]
    start = step
    while step < steps:
        action = hooks.control()
        if action != "continue":
            if step > start:
                hooks.save_checkpoint(
                    step, lambda d, s=step: _write_noop_checkpoint(d, job_id, s), {"step": step}
                )
            return TrainResult(action, step, step, lambda d: _write_noop_adapter(d, job_id))
        time.sleep(step_seconds)
        step += 1
        hooks.log(f"Step {step}/{steps}: training loss=0.0000", {"step": step, "train_loss": 0.0})
        if checkpoint_every and step % checkpoint_every == 0 and step < steps:
            hooks.save_checkpoint(
                step, lambda d, s=step: _write_noop_checkpoint(d, job_id, s), {"step": step}
            )
    return TrainResult("continue", step, step, lambda d: _write_noop_adapter(d, job_id))


def _write_noop_adapter(directory: Path, job_id: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    seed = int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:4], "little")
    save_file(
        {"noop": np.random.default_rng(seed).random(4, dtype=np.float32)},
        directory / WEIGHTS_FILE,
    )
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "noop": True}))


def _write_noop_checkpoint(directory: Path, job_id: str, step: int) -> None:
    _write_noop_adapter(directory / "adapter", job_id)
    (directory / "state").mkdir()
    (directory / "state" / "trainer_state.json").write_text(json.dumps({"step": step}))
