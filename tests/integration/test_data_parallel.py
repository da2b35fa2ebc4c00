"""One job data-parallel over two gloo processes on the CPU (worker/ranks.py, worker/distributed.py):
it trains as one process does at the same global batch, and a rank killed with SIGKILL ends the
attempt, which the worker retries from the job's last checkpoint."""

import json
import multiprocessing
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import select

from app.core.artifacts import WEIGHTS_FILE
from app.core.db import session_scope
from app.core.hyperparameters import TrainingHyperparameters
from app.models import Checkpoint
from tests.chat_template_support import family_tokenizer
from tests.model_families_support import build_base
from tests.worker_support import (
    HYPERPARAMETERS,
    RecordingHooks,
    create_file,
    create_job,
    create_tenant,
    events,
    get_job,
    metric_steps,
    update_job,
    wait_for,
    worker_thread,
)
from worker import pipeline, ranks
from worker.distributed import DataParallel
from worker.hooks import ResidentBase

pytestmark = pytest.mark.slow  # every test here trains a model in several processes

# Steps of 4, 4 and 1 examples of different lengths: uneven shares, and a step with none for rank 1.
EXAMPLES = [{"prompt": f"{a} plus {a * 7} is ", "completion": f"{a + a * 7}" * (1 + a % 3)} for a in range(9)]
JOB = {"n_epochs": 2, "batch_size": 4, "lora_r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}


@pytest.fixture(scope="module")
def tiny_base(base_model_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    build_base("llama", directory, family_tokenizer(base_model_dir, "llama"))
    return directory


def job_config(base_dir, tmp_path, validation: bool = False, **hyperparameters) -> pipeline.JobConfig:
    lines = [json.dumps(example) + "\n" for example in EXAMPLES]
    (tmp_path / "train.jsonl").write_text("".join(lines))
    (tmp_path / "valid.jsonl").write_text("".join(lines[:5]))
    # No validation by default: on a CPU with AVX512-BF16, bitsandbytes repacks the 4-bit weights
    # for an eval forward and unpacks them to save a checkpoint, which only rank 0 does; the ranks
    # would then train through different (equally exact) kernels, and AdamW's first steps turn
    # such rounding into visible differences.
    return pipeline.JobConfig.from_job(
        TrainingHyperparameters.model_construct(**{**HYPERPARAMETERS, **JOB, **hyperparameters}).model_dump(),
        base_model_dir=base_dir,
        training_file=tmp_path / "train.jsonl",
        validation_file=tmp_path / "valid.jsonl" if validation else None,
        seed=5,
        device="cpu",
        checkpoint_every_steps=1,
    )


def test_shares_cover_each_step_once_and_balance_its_tokens():
    from worker.data import Example

    step = [Example([1] * n, [1] * n) for n in (5, 30, 8, 8, 21, 3, 12)]
    shares = [DataParallel(rank, 3).shard(step) for rank in range(3)]
    assert sorted(id(e) for share in shares for e in share) == sorted(id(e) for e in step)
    assert [sum(len(e.input_ids) for e in share) for share in shares] == [30, 29, 28]
    assert DataParallel().shard(step) == step


def test_two_ranks_train_as_one_process(tiny_base, tmp_path):
    config = job_config(tiny_base, tmp_path)
    one = RecordingHooks(tmp_path / "one")
    alone = pipeline.train(config, one, ResidentBase())
    alone.save_adapter(tmp_path / "one-adapter")
    two = RecordingHooks(tmp_path / "two")
    both = ranks.train(config, two, ResidentBase(), None, worker_gpus="0,1")
    both.save_adapter(tmp_path / "two-adapter")

    assert (both.outcome, both.step, both.trained_tokens) == (alone.outcome, alone.step, alone.trained_tokens)
    steps, losses = zip(*one.metrics("train_loss"), strict=True)
    assert [s for s, _ in two.metrics("train_loss")] == list(steps) == list(range(1, 7))
    assert [loss for _, loss in two.metrics("train_loss")] == pytest.approx(losses, rel=1e-6)
    assert_same_weights(tmp_path / "two-adapter", tmp_path / "one-adapter")
    # Rank 0's checkpoints came over the pipe whole: adapter and training state.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [f"step-{s}" for s in range(1, 7)]
    assert_same_weights(tmp_path / "two" / "step-6" / "adapter", tmp_path / "one" / "step-6" / "adapter")
    assert (tmp_path / "two" / "step-6" / "state" / "optimizer.safetensors").is_file()


def assert_same_weights(directory, reference) -> None:
    trained, expected = load_file(directory / WEIGHTS_FILE), load_file(reference / WEIGHTS_FILE)
    assert trained.keys() == expected.keys()
    for name, weights in expected.items():
        assert torch.allclose(trained[name], weights, rtol=1e-5, atol=1e-7), name


def test_a_rank_s_user_error_fails_the_job_as_on_one_process(tiny_base, tmp_path):
    config = job_config(tiny_base, tmp_path, target_modules=["q_proj", "query_key_value"])
    with pytest.raises(pipeline.UserError) as raised:
        ranks.train(config, RecordingHooks(tmp_path), ResidentBase(), None, worker_gpus="0,1")
    assert raised.value.code == "invalid_hyperparameters" and "query_key_value" in raised.value.message
    assert not multiprocessing.active_children()


def rank_process(rank: int):
    return next((p for p in multiprocessing.active_children() if p.name == f"tuneforge-rank-{rank}"), None)


def checkpoint_steps(job_id: str) -> list[int]:
    with session_scope() as session:
        return sorted(session.scalars(select(Checkpoint.step).where(Checkpoint.job_id == job_id)))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_killed_rank_ends_the_attempt_and_the_job_resumes_from_its_checkpoint(settings, tiny_base):
    tenant = create_tenant()
    training_file = create_file(settings, tenant, EXAMPLES * 2, "prompt_completion")
    validation_file = create_file(settings, tenant, EXAMPLES[:5], "prompt_completion")
    job_id = create_job(tenant, training_file, validation_file, **{**JOB, "n_epochs": 8})
    update_job(job_id, model="tiny")
    worker = {
        "base_models": {"tiny": tiny_base},
        "worker_gpus": "0,1",
        "heartbeat_seconds": 0.2,
        "poll_seconds": 0.1,
        "checkpoint_every_steps": 2,
        "retry_backoff_seconds": 0.1,
    }
    with worker_thread(settings, **worker):
        wait_for(lambda: checkpoint_steps(job_id), timeout=120, message="a checkpoint")
        victim = rank_process(1)
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = max(checkpoint_steps(job_id))
        wait_for(lambda: get_job(job_id).status in ("succeeded", "failed"), timeout=180, message="the end")
    job = get_job(job_id)
    assert job.status == "succeeded", job.error
    assert job.attempt == 2 and job.infra_failures == 1
    retry = next(e for e in events(job_id) if e.level == "warning")
    assert f"rank 1 of 2 (pid {victim.pid}) was killed by SIGKILL" in retry.message
    resumed = [
        e.data["resumed_from_step"] for e in events(job_id) if e.data and "resumed_from_step" in e.data
    ]
    assert resumed and resumed[0] >= killed_at
    assert metric_steps(job_id)[-1] == 40 and job.trained_tokens > 0
    assert all(e.data["valid_loss"] > 0 for e in events(job_id) if "valid_loss" in (e.data or {}))
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_pause_resume_and_cancel_reach_every_rank(settings, tiny_base):
    tenant = create_tenant()
    training_file = create_file(settings, tenant, EXAMPLES * 2, "prompt_completion")
    job_id = create_job(tenant, training_file, **{**JOB, "n_epochs": 30})
    update_job(job_id, model="tiny")
    worker = {
        "base_models": {"tiny": tiny_base},
        "worker_gpus": "0,1",
        "heartbeat_seconds": 0.1,
        "poll_seconds": 0.1,
        "checkpoint_every_steps": 1000,
    }
    with worker_thread(settings, **worker):
        wait_for(lambda: metric_steps(job_id), timeout=120, message="training to start")
        update_job(job_id, pause_requested=True)
        wait_for(lambda: get_job(job_id).status == "paused", timeout=60, message="the job to pause")
        paused_at = checkpoint_steps(job_id)[-1]
        assert max(metric_steps(job_id)) <= paused_at
        wait_for(lambda: not multiprocessing.active_children(), timeout=30, message="the ranks to exit")

        update_job(job_id, status="queued")  # what the API's resume does
        wait_for(lambda: max(metric_steps(job_id)) > paused_at, timeout=120, message="training to go on")
        update_job(job_id, status="cancelled")
        wait_for(lambda: "cancelled" in events(job_id)[-1].message, timeout=60, message="the worker to stop")
        assert not multiprocessing.active_children()
    resumed = [e.data["resumed_from_step"] for e in events(job_id) if "resumed_from_step" in (e.data or {})]
    assert resumed == [paused_at]
    assert get_job(job_id).status == "cancelled" and max(metric_steps(job_id)) < 150
