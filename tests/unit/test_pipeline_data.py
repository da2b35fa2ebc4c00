"""Loss masks and a pickle-free training state round trip."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from app.core.training_rows import parse_row
from worker.data import IGNORE_INDEX, Example, tokenize_row
from worker.pipeline import read_training_state, write_training_state


@pytest.fixture(scope="module")
def tokenizer(base_model_dir):
    return AutoTokenizer.from_pretrained(base_model_dir)


def learned_text(example: Example, tokenizer) -> str:
    return tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=False) if label != IGNORE_INDEX]
    )


def test_chat_loss_only_on_assistant_turns(tokenizer):
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Name?"},
            {"role": "assistant", "content": "Smol."},
        ]
    }
    text = learned_text(tokenize_row(parse_row(row), tokenizer), tokenizer)
    assert "Hello." in text and "Smol." in text
    assert "Hi?" not in text and "Name?" not in text and "Be brief." not in text and "user" not in text


def test_prompt_completion_loss_only_on_completion_and_eos(tokenizer):
    example = tokenize_row(parse_row({"prompt": "2+2=", "completion": " four"}), tokenizer)
    assert learned_text(example, tokenizer) == " four" + tokenizer.eos_token
    example = tokenize_row(parse_row({"text": "all of it"}), tokenizer)
    assert example.labels == example.input_ids


def test_training_state_round_trips_without_pickle(tmp_path):
    def tiny():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s))

    model, optimizer, scheduler = tiny()
    for _ in range(3):
        model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    write_training_state(tmp_path / "ckpt", model, optimizer, scheduler, {"step": 3, "trained_tokens": 12})
    files = {p.suffix for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    assert files <= {".json", ".safetensors", ".md"}

    restored, restored_optimizer, restored_scheduler = tiny()
    state = read_training_state(tmp_path / "ckpt", restored, restored_optimizer, restored_scheduler)
    assert state["step"] == 3 and state["trained_tokens"] == 12
    assert restored_scheduler.last_epoch == 3 and restored_scheduler.get_last_lr() == scheduler.get_last_lr()
    for (name, p), (_, q) in zip(model.named_parameters(), restored.named_parameters(), strict=False):
        if p.requires_grad:
            assert torch.equal(p, q), name
    for slot, restored_slot in zip(optimizer.state.values(), restored_optimizer.state.values(), strict=False):
        assert torch.equal(slot["exp_avg_sq"], restored_slot["exp_avg_sq"])
    json.loads((tmp_path / "ckpt" / "state" / "trainer_state.json").read_text())
