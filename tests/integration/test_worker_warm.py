"""Warm workers: a worker keeps the base model loaded between jobs, and a job trained on that
resident base comes out as it would from a worker that loaded the base for it."""

import weakref

import pytest
import torch
from safetensors.torch import load_file

from app.core.artifacts import WEIGHTS_FILE
from app.core.db import session_scope
from app.core.hyperparameters import TrainingHyperparameters
from app.models import Model
from tests.chat_template_support import family_tokenizer
from tests.conftest import link_base_model
from tests.model_families_support import build_base
from tests.worker_support import (
    ARITHMETIC,
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
from worker import pipeline
from worker.hooks import ResidentBase

pytestmark = pytest.mark.slow  # every test here trains a model

FAST = {"heartbeat_seconds": 0.2, "poll_seconds": 0.1, "checkpoint_every_steps": 1000}
# Job B differs from the jobs before it in data, seed and LoRA shape; its dropout draws from the
# RNG, so a seed that depended on what ran before would show in its adapter.
JOB_B = {"seed": 7, "lora_r": 4, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}


def finish(job_id: str) -> str:
    wait_for(
        lambda: get_job(job_id).status in ("succeeded", "failed", "cancelled"),
        timeout=180,
        message=f"{job_id} to finish",
    )
    return job_id


def base_model_events(job_id: str) -> list[bool]:
    return [
        e.data["base_model_resident"] for e in events(job_id) if e.data and "base_model_resident" in e.data
    ]


def adapter(settings, job_id: str) -> dict[str, torch.Tensor]:
    job = get_job(job_id)
    assert job.status == "succeeded", job.error
    with session_scope() as session:
        path = session.get(Model, job.fine_tuned_model).path
    return load_file(settings.data_dir / path / WEIGHTS_FILE)


def assert_same_adapter(settings, job_id: str, reference_id: str) -> None:
    trained, reference = adapter(settings, job_id), adapter(settings, reference_id)
    assert trained.keys() == reference.keys()
    for name, weights in reference.items():
        assert torch.allclose(trained[name], weights, rtol=1e-5, atol=1e-7), name


def train_b_on_a_fresh_worker(settings, tenant: str, file_b: str) -> str:
    """The reference: job B on a worker that loads the base for it."""
    with worker_thread(settings, **FAST):
        reference = finish(create_job(tenant, file_b, **JOB_B))
    assert base_model_events(reference) == [False]
    return reference


def test_a_job_after_another_on_a_warm_worker_trains_as_on_a_fresh_one(settings, base_model_dir):
    link_base_model(settings.data_dir, base_model_dir)
    tenant = create_tenant()
    file_a = create_file(settings, tenant, ARITHMETIC[:3], "prompt_completion")
    file_b = create_file(settings, tenant, ARITHMETIC[8:11], "prompt_completion")
    with worker_thread(settings, **FAST):
        job_a = finish(create_job(tenant, file_a, seed=1, lora_dropout=0.05))
        job_b = finish(create_job(tenant, file_b, **JOB_B))
    reference = train_b_on_a_fresh_worker(settings, tenant, file_b)

    assert get_job(job_a).status == "succeeded"
    assert base_model_events(job_a) == [False] and base_model_events(job_b) == [True]
    assert_same_adapter(settings, job_b, reference)
    for job_id in (job_a, job_b):
        first = next(e.data for e in events(job_id) if e.data and "train_loss" in e.data)
        assert first["step"] == 1 and 0 < first["since_claim_s"] < 120
        assert metric_steps(job_id) == [1, 3]  # the first step, then the end of the epoch


def test_a_job_after_a_cancelled_and_a_failed_one_on_a_warm_worker_trains_as_on_a_fresh_one(
    settings, base_model_dir
):
    link_base_model(settings.data_dir, base_model_dir)
    tenant = create_tenant()
    long_file = create_file(settings, tenant, ARITHMETIC, "prompt_completion")
    file_b = create_file(settings, tenant, ARITHMETIC[8:11], "prompt_completion")
    with worker_thread(settings, **FAST):
        cancelled = create_job(tenant, long_file)
        wait_for(lambda: metric_steps(cancelled), timeout=120, message="training to start")
        update_job(cancelled, status="cancelled")  # what the API's cancel does
        wait_for(
            lambda: any("cancelled" in e.message for e in events(cancelled)),
            timeout=30,
            message="the worker to stop",
        )
        failed = finish(create_job(tenant, file_b, target_modules=["q_proj", "query_key_value"]))
        job_b = finish(create_job(tenant, file_b, **JOB_B))
    reference = train_b_on_a_fresh_worker(settings, tenant, file_b)

    assert get_job(cancelled).status == "cancelled" and max(metric_steps(cancelled)) < len(ARITHMETIC)
    assert get_job(failed).error["code"] == "invalid_hyperparameters"
    assert [base_model_events(job) for job in (cancelled, failed, job_b)] == [[False], [True], [True]]
    assert_same_adapter(settings, job_b, reference)


def as_loaded(model) -> tuple[dict, dict]:
    """What must be the same on a resident base after a job as right after loading it: its
    structure and flags, and every tensor of its state dict (4-bit weights with their quant state)."""
    structure = {
        "modules": [
            (name, type(module), len(module._forward_hooks)) for name, module in model.named_modules()
        ],
        "parameters": [
            (name, p.dtype, p.requires_grad, p.grad is None) for name, p in model.named_parameters()
        ],
        "flags": (model.training, model.is_gradient_checkpointing, hasattr(model, "peft_config")),
    }
    return structure, {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_as_loaded(model, loaded: tuple[dict, dict]) -> None:
    structure, tensors = as_loaded(model)
    assert structure == loaded[0]
    assert tensors.keys() == loaded[1].keys()
    assert all(torch.equal(tensors[name], tensor) for name, tensor in loaded[1].items())


def job_config(base_dir, tmp_path, **hyperparameters) -> pipeline.JobConfig:
    """Two prompt/completion examples, one per step."""
    training_file = tmp_path / "train.jsonl"
    training_file.write_text("".join(f'{{"prompt": "{a}+1=", "completion": "{a + 1}"}}\n' for a in range(2)))
    return pipeline.JobConfig.from_job(
        TrainingHyperparameters.model_construct(**{**HYPERPARAMETERS, **hyperparameters}).model_dump(),
        base_model_dir=base_dir,
        training_file=training_file,
        validation_file=None,
        seed=3,
        device="cpu",
        checkpoint_every_steps=1000,
    )


def resident_flags(hooks: RecordingHooks) -> list[bool]:
    return [data["base_model_resident"] for _, data in hooks.events if "base_model_resident" in data]


def test_the_resident_base_is_as_loaded_after_each_job(base_model_dir, tmp_path):
    resident, hooks = ResidentBase(), RecordingHooks(tmp_path)
    base = pipeline.resident_base_model(resident, job_config(base_model_dir, tmp_path), hooks)
    loaded = as_loaded(base)
    for hyperparameters in ({}, {"lora_r": 4, "target_modules": ["q_proj", "v_proj"]}):
        result = pipeline.train(job_config(base_model_dir, tmp_path, **hyperparameters), hooks, resident)
        assert result.outcome == "continue" and result.step == 2
        result.save_adapter(tmp_path / f"adapter-{len(hooks.events)}")
        resident.end_job()
        assert resident.model is base and resident.detach is None
        assert_as_loaded(base, loaded)
    assert resident_flags(hooks) == [False, True, True]


def test_a_job_on_another_base_replaces_the_resident_one(base_model_dir, tmp_path):
    tokenizer = family_tokenizer(base_model_dir, "llama")
    first, second = tmp_path / "tiny-first", tmp_path / "tiny-second"
    for directory in (first, second):
        build_base("llama", directory, tokenizer)
    resident, hooks = ResidentBase(), RecordingHooks(tmp_path)
    bases = []
    for directory in (first, second, second, first):
        pipeline.train(job_config(directory, tmp_path), hooks, resident)
        resident.end_job()
        bases.append(weakref.ref(resident.model))
    assert resident_flags(hooks) == [False, False, True, False]
    assert bases[1]() is None and bases[2]() is None  # the second base was freed for the first again
    assert bases[0]() is None  # the first one too: the last job loaded it afresh
    assert bases[3]() is resident.model
