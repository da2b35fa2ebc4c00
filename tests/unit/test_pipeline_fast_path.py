"""The fast training path (packed rows, block-diagonal attention, chunked cross-entropy over target
positions) trains exactly like transformers' own padded forward + loss on the same steps."""

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.worker_support import random_examples
from worker import pipeline
from worker.data import IGNORE_INDEX, Example
from worker.lora_forward import use_fused_lora_forward


def _config(base_model_dir: Path = Path("-"), **overrides) -> pipeline.TrainConfig:
    """No files: these tests hand the steps their examples."""
    values = {
        "base_model_dir": base_model_dir,
        "training_file": Path("-"),
        "validation_file": None,
        "seed": 0,
        "device": "cpu",
        "checkpoint_every_steps": 100,
        "n_epochs": 1,
        "batch_size": 4,
        "learning_rate_multiplier": 5.0,
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": "all-linear",
        "max_seq_length": 64,
        "packing": True,
    }
    values.update(overrides)
    return pipeline.TrainConfig(**values)


def _run(model, initial: dict, config, steps, data, step_fn) -> list[float]:
    """Train from the same initial LoRA weights (one loaded model serves every run)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(initial[name])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = pipeline.make_optimizer(trainable, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    losses = []
    for step in range(steps):
        chunk = data[step * config.batch_size : (step + 1) * config.batch_size]
        losses.append(float(step_fn(model, chunk, 0, config)))
        pipeline.optimizer_step(trainable, optimizer, scheduler)
    return losses


def test_pack_rows_keeps_examples_whole_and_rows_within_length():
    data = random_examples(40, 1000)
    rows = pipeline.pack_rows(data, 64, packing=True)
    assert sorted(id(ex) for row in rows for ex in row) == sorted(id(ex) for ex in data)
    assert all(sum(len(ex.input_ids) for ex in row) <= 64 for row in rows)
    assert len(rows) < len(data)


def test_micro_batch_targets_stay_inside_each_example():
    a = Example([5, 6, 7], [IGNORE_INDEX, 6, 7])
    b = Example([8, 9], [8, 9])
    (batch,) = pipeline.micro_batches([a, b], 0, _config(max_seq_length=16))
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # position 0 predicts 6, 1 predicts 7; a's last token predicts nothing (not b's first); 3 predicts 9
    assert batch["target_index"].tolist() == [0, 1, 3]
    assert batch["targets"].tolist() == [6, 7, 9]
    # The same blocks for varlen attention: each example, in the flattened batch.
    assert batch["cu_seqlens"].tolist() == [0, 3, 5]
    assert batch["max_seqlen"] == 3


def test_micro_batch_sequence_bounds_count_each_rows_padding_as_its_own_block():
    a, b = Example([5, 6, 7], [5, 6, 7]), Example([8, 9], [8, 9])
    (batch,) = pipeline.micro_batches([a, b], 0, _config(max_seq_length=16, packing=False))
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["cu_seqlens"].tolist() == [0, 3, 5, 6]


def test_packed_row_equals_separate_sequences(base_model_dir):
    """Position ids restarting per example make the attention block-diagonal: the second example of
    a packed row sees nothing of the first."""
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32).eval()
    a, b = (
        Example([1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7]),
        Example([8, 9, 10, 11, 12], [8, 9, 10, 11, 12]),
    )
    (packed,) = pipeline.micro_batches([a, b], 0, _config(max_seq_length=16))
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]]
    assert 6 not in packed["target_index"].tolist()  # b's first token is not predicted from a
    with torch.no_grad():
        logits = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).logits
        alone_b = model(input_ids=torch.tensor([b.input_ids]), use_cache=False).logits
    assert torch.allclose(logits[:, 7:], alone_b, atol=1e-3)


def _use_peft_forward(model) -> None:
    """Back to PEFT's own LoRA forward (attach_lora installs the fused one per instance)."""
    for module in model.modules():
        module.__dict__.pop("forward", None)


@pytest.mark.slow
def test_fast_path_loss_equals_plain_path(base_model_dir):
    """Two optimizer steps: equal losses at step 1 mean equal forward; at step 2, equal gradients.
    Plain = transformers' padded forward and loss through PEFT's own LoRA forward."""
    config = _config(base_model_dir)
    torch.manual_seed(0)
    model = pipeline.attach_lora(pipeline.load_base_model(base_model_dir, "cpu"), config)
    model.train()
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = random_examples(8, 10_000)
    _use_peft_forward(model)
    plain = _run(model, initial, config, 2, data, pipeline.plain_step)
    assert use_fused_lora_forward(model) == 7 * model.config.num_hidden_layers
    for packing in (True, False):
        config = _config(base_model_dir, packing=packing)
        assert len(pipeline.micro_batches(data[:4], 0, config)[0]["input_ids"]) == (2 if packing else 4)
        fast = _run(model, initial, config, 2, data, pipeline.train_step)
        for p, f in zip(plain, fast, strict=True):
            assert f == pytest.approx(p, rel=1e-3)
    assert plain[1] < plain[0]  # it trained


@pytest.mark.parametrize(("dropout", "autocast"), [(0.0, False), (0.1, False), (0.0, True)])
def test_fused_lora_forward_matches_peft(base_model_dir, dropout, autocast):
    """One NF4 LoRA layer with nonzero B: same output and same LoRA gradients as PEFT's forward
    (dropout masks drawn from the same seed). Under bf16 autocast (what CUDA training runs), equal
    to bf16 precision."""
    config = _config(base_model_dir, lora_dropout=dropout)
    model = pipeline.attach_lora(pipeline.load_base_model(base_model_dir, "cpu"), config)
    model.train()
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    results = []
    for fused in (False, True):
        layer.__dict__.pop("forward", None)
        if fused:
            use_fused_lora_forward(layer)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = layer(x).float()
        out.square().sum().backward()
        grads = [p.grad.clone() for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight, x)]
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight, x):
            p.grad = None
        results.append((out.detach(), grads))
    (plain_out, plain_grads), (fused_out, fused_grads) = results
    assert (plain_out - layer.base_layer(x)).abs().max() > 1e-3  # the adapter contributes
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(fused_out, plain_out, **tolerance)
    for fused_grad, plain_grad in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(
            fused_grad / plain_grad.abs().max(), plain_grad / plain_grad.abs().max(), **tolerance
        )


@pytest.mark.slow
def test_bench_train_runs_the_worker_recipe_and_counts_tokens(base_model_dir):
    """The benchmarks' entry (bench/train.py, bench/train_matrix.py) on the CPU: timed steps count
    the real tokens after warm-up, and the recorded loss falls on a repeated batch."""
    rnd = random.Random(0)
    batch = [[rnd.randrange(3, 10_000) for _ in range(30)] for _ in range(2)]
    result = pipeline.bench_train(
        batch * 4,
        str(base_model_dir),
        steps=4,
        warmup_steps=1,
        device="cpu",
        batch_size=2,
        max_seq_length=64,
        learning_rate_multiplier=50.0,
    )
    assert result["steps"] == 4 and result["tokens"] == 3 * 2 * 30
    losses = [loss for _, loss in result["loss_trajectory"]]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_expanded_double_quantization_dequantizes_to_the_same_weights(base_model_dir):
    from bitsandbytes.functional import dequantize_4bit

    model = pipeline.load_base_model(base_model_dir, "cpu")  # double-quantized (expanded on CUDA only)
    weights = [m.weight for m in model.modules() if hasattr(getattr(m, "weight", None), "quant_state")]
    assert all(w.quant_state.nested for w in weights)
    sample = weights[:: len(weights) // 10]
    before = [dequantize_4bit(w.data, w.quant_state) for w in sample]
    assert pipeline.expand_double_quantization(model) == len(weights) == 30 * 7  # SmolLM2's linears
    assert not any(w.quant_state.nested for w in weights)
    for w, expected in zip(sample, before, strict=True):
        assert torch.equal(dequantize_4bit(w.data, w.quant_state), expected)
