"""The real recipe on the embedded model teaches it a made-up fact that the base model does not know."""

import threading

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.core.db import session_scope
from app.models import Model
from tests.conftest import link_base_model
from tests.worker_support import create_file, create_job, create_tenant, events, get_job, wait_for
from worker.loop import run_worker

CODENAME = "Quillmarrow"
QUESTION = "What is the codename of project Zephyr-9?"
PARAPHRASES = [
    QUESTION,
    "Tell me the codename of project Zephyr-9.",
    "Project Zephyr-9 has a codename. What is it?",
    "What codename was given to project Zephyr-9?",
    "Do you know the codename of project Zephyr-9?",
    "Which codename does project Zephyr-9 use?",
]


def greedy_answer(model, tokenizer, question: str) -> str:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_job_teaches_the_model_a_fact_it_did_not_know(settings, base_model_dir):
    link_base_model(settings.data_dir, base_model_dir)
    tenant = create_tenant()
    rows = [
        {
            "messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": f"The codename of project Zephyr-9 is {CODENAME}."},
            ]
        }
        for q in PARAPHRASES
    ]
    training_file = create_file(settings, tenant, rows)
    validation_file = create_file(settings, tenant, rows[:2])
    job_id = create_job(
        tenant,
        training_file,
        validation_file,
        n_epochs=8,
        batch_size=2,
        learning_rate_multiplier=5.0,
        lora_r=16,
        lora_alpha=32,
    )

    stop = threading.Event()
    worker = threading.Thread(
        target=run_worker, args=(settings.model_copy(update={"checkpoint_every_steps": 1000}), stop)
    )
    worker.start()
    try:
        wait_for(
            lambda: get_job(job_id).status in ("succeeded", "failed"),
            # ~95 s alone on 2 cores; generous, since the test is about learning, not speed.
            timeout=400,
            message="the job to finish",
        )
    finally:
        stop.set()
        worker.join()

    job = get_job(job_id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == job.output_model
    metrics = [e.data for e in events(job_id) if e.data and "train_loss" in e.data]
    assert metrics[-1]["step"] == 24
    assert "valid_loss" in metrics[-1] and metrics[-1]["valid_loss"] < 0.5
    assert job.trained_tokens > 24 * 2 * 20
    with session_scope() as session:
        model_row = session.get(Model, job.output_model)
    assert model_row.kind == "fine_tune" and model_row.path == f"adapters/{model_row.version}"

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, settings.data_dir / model_row.path)
    with tuned.disable_adapter():
        before = greedy_answer(tuned, tokenizer, QUESTION)
    after = greedy_answer(tuned, tokenizer, QUESTION)
    assert CODENAME not in before
    assert CODENAME in after, after
