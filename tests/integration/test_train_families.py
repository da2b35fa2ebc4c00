"""Every family trains: a 2-step fine-tuning job on a tiny random model of each family (with that
family's chat template) runs through the worker loop and the real recipe (NF4, gradient
checkpointing, LoRA on all linear layers, chat rows to train on, prompt/completion rows to
validate on), and the adapter it publishes, served by the engine, gives the tokens transformers +
PEFT give with the saved adapter. And the packed fast path trains like transformers' own loss for
every family."""

import pytest
import torch
from sqlalchemy import select

from app.core.db import session_scope
from app.inference.messages import AdapterRef
from app.models import Model
from tests.chat_template_support import CHAT_TEMPLATES, family_tokenizer
from tests.model_families_support import build_base, engine_texts, transformers_greedy
from tests.worker_support import (
    create_file,
    create_job,
    create_tenant,
    events,
    get_job,
    random_examples,
    update_job,
    wait_for,
    worker_thread,
)
from worker import pipeline

FAMILIES = list(CHAT_TEMPLATES)
SYSTEM = {"role": "system", "content": "You are a geography tutor."}
CHATS = [
    [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ],
    [{"role": "user", "content": "Capital of Spain?"}, {"role": "assistant", "content": "Madrid."}],
]
PAIRS = [
    {"prompt": "Capital of Peru? ", "completion": "Lima."},
    {"prompt": "Capital of Chile? ", "completion": "Santiago."},
]


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_two_step_job_trains_and_its_adapter_is_served(family, settings, base_model_dir, tmp_path):
    tokenizer = family_tokenizer(base_model_dir, family)
    base_dir = tmp_path / f"tiny-{family}"
    build_base(family, base_dir, tokenizer)
    system = [SYSTEM] if CHAT_TEMPLATES[family].system else []
    tenant = create_tenant()
    training_file = create_file(settings, tenant, [{"messages": system + chat} for chat in CHATS], "chat")
    validation_file = create_file(settings, tenant, PAIRS, "prompt_completion")
    job_id = create_job(
        tenant, training_file, validation_file, max_seq_length=128, learning_rate_multiplier=50.0
    )
    update_job(job_id, model=base_dir.name)

    with worker_thread(settings, base_models={base_dir.name: base_dir}, poll_seconds=0.1):
        job = wait_for(
            lambda: (job := get_job(job_id)).status in ("succeeded", "failed") and job,
            timeout=60,
            message="the job to finish",
        )
    assert job.status == "succeeded", job.error
    validated = [e.data["step"] for e in events(job_id) if e.data and "valid_loss" in e.data]
    assert validated == [2] and job.trained_tokens > 0
    with session_scope() as session:
        model = session.scalar(select(Model).where(Model.id == job.fine_tuned_model))
        assert model.base_model == base_dir.name
        ref = AdapterRef(model.version, settings.data_dir / model.path)

    question = [{"role": "user", "content": "Capital of Germany?"}]
    text = tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = []
    for adapter in (None, ref):
        tokens = transformers_greedy(base_dir, ids, adapter)
        # The engine ends a completion at EOS without writing it.
        if tokenizer.eos_token_id in tokens:
            tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
        expected.append(tokenizer.decode(tokens))
    assert expected[0] != expected[1]  # what it learned shows
    assert engine_texts(base_dir, tmp_path / "serving", [(ids, None), (ids, ref)]) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_fast_path_loss_equals_transformers_loss(family, base_model_dir, tmp_path):
    """The fast path packs examples into rows whose attention must stay block-diagonal, also under
    sliding windows, soft-capped attention and fused projections. Without final logit soft-capping
    (which real Gemma 3 configs do not set), Gemma takes the fast path too."""
    tokenizer = family_tokenizer(base_model_dir, family)
    build_base(family, tmp_path, tokenizer, final_logit_softcapping=None)
    config = pipeline.bench_config(
        tmp_path, device="cpu", batch_size=4, max_seq_length=64, packing=True, lora_dropout=0.0
    )
    model = pipeline.attach_lora(pipeline.load_base_model(tmp_path, "cpu"), config)
    model.train()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    assert pipeline._uses_plain_logits(model)
    data = random_examples(4, len(tokenizer), min_length=12)
    assert len(pipeline.micro_batches(data, 0, config)[0]["input_ids"]) < len(data)  # packed
    fast = float(pipeline.train_step(model, data, 0, config))
    plain = float(pipeline.plain_step(model, data, 0, config))
    assert fast == pytest.approx(plain, rel=1e-5)
    # The check can fail: the first row's positions continued across examples change the loss.
    (batch,) = pipeline.micro_batches(data, 0, config)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    with torch.no_grad():
        leaky = float(pipeline.micro_batch_loss_sum(model, batch, "cpu")) / len(batch["targets"])
    assert leaky != pytest.approx(plain, rel=1e-4)
