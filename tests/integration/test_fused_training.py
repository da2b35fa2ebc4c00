"""The training step on CUDA with worker/fused_kernels.py (Liger's RMSNorm, SwiGLU and rotary,
varlen attention over packed rows) against the same step through transformers' own modules and
SDPA, for each family it covers (Mistral's with a sliding window shorter than its examples): the
same loss and the same LoRA gradients, to bf16 rounding."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from tests.model_families_support import build_base
from tests.worker_support import random_examples
from worker import fused_kernels, pipeline

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tokenizer(base_model_dir):
    return AutoTokenizer.from_pretrained(base_model_dir)


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen3"])
def base_dir(request, tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("bases") / f"tiny-{request.param}"
    build_base(request.param, directory, tokenizer)
    return directory


def test_varlen_attention_equals_sdpa_with_the_block_diagonal_mask():
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim, rows, width = 8, 2, 64, 2, 32
    lengths = [[10, 15, 7], [20, 12]]  # the second row has no padding
    q, k, v = (
        torch.randn(rows, h, width, head_dim, generator=gen).to("cuda", torch.bfloat16)
        for h in (heads, kv_heads, kv_heads)
    )
    bounds, mask = [0], torch.zeros(rows, 1, width, width, dtype=torch.bool)
    for r, row in enumerate(lengths):
        start = 0
        for n in row + [width - sum(row)] if sum(row) < width else row:
            mask[r, 0, start : start + n, start : start + n] = torch.ones(n, n, dtype=torch.bool).tril()
            start += n
            bounds.append(r * width + start)
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, heads // kv_heads
    out, _ = fused_kernels.varlen_attention(
        module, q, k, v, None, scaling=head_dim**-0.5, tuneforge_cu_seqlens=cu, tuneforge_max_seqlen=20
    )
    reference = F.scaled_dot_product_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=mask.cuda(), scale=head_dim**-0.5
    ).transpose(1, 2)
    torch.testing.assert_close(out, reference, atol=2e-2, rtol=0)


def _step(base_model_dir, fused: bool, monkeypatch):
    if not fused:
        monkeypatch.setattr(pipeline, "use_fused_kernels", lambda model: 0)
    config = pipeline.bench_config(base_model_dir, batch_size=8, max_seq_length=128, lora_dropout=0.0)
    base = pipeline.load_base_model(base_model_dir, "cuda")
    torch.manual_seed(0)
    model = pipeline.attach_lora(base, config)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # not zero, as initialised, so that lora_A gets a gradient too
            torch.nn.init.normal_(param, std=0.02)
    model.train()
    data = random_examples(8, base.config.vocab_size, min_length=12)
    loss = pipeline.train_step(model, data, 0, config)
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    patched = sum(type(m).__name__.endswith("MLP") and "forward" in m.__dict__ for m in base.modules())
    monkeypatch.undo()
    return float(loss), grads, patched


def test_fused_step_equals_transformers_step(base_dir, monkeypatch):
    loss, grads, patched = _step(base_dir, True, monkeypatch)
    plain_loss, plain_grads, plain_patched = _step(base_dir, False, monkeypatch)
    assert patched == 2 and plain_patched == 0  # both layers' MLPs, and none
    assert loss == pytest.approx(plain_loss, rel=1e-2)
    for name, grad in grads.items():
        cosine = F.cosine_similarity(grad.flatten(), plain_grads[name].flatten(), dim=0)
        assert cosine > 0.98, name


@pytest.mark.parametrize("rows", [2048, 3000])  # past 1,536 rows bitsandbytes dequantizes and multiplies
def test_frozen_nf4_linear_equals_bitsandbytes(rows):
    import bitsandbytes as bnb

    from worker.lora_forward import _FrozenQuantizedLinear, frozen_quantized

    torch.manual_seed(0)
    dense = torch.nn.Linear(512, 384, bias=False)

    def quantized(**kwargs):
        layer = bnb.nn.Linear4bit(
            512, 384, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", **kwargs
        )
        layer.load_state_dict(dense.state_dict())
        return layer.cuda()

    layer = quantized(compress_statistics=False)
    x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(rows, 384, device="cuda", dtype=torch.bfloat16)
    expected = layer(x)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    frozen = frozen_quantized(layer)
    out = _FrozenQuantizedLinear.apply(x, frozen)
    (out_grad,) = torch.autograd.grad(out, x, grad)
    assert torch.equal(out, expected) and torch.equal(out_grad, expected_grad)
    # nested block scales (double quantization not expanded) keep bitsandbytes' own forward
    assert frozen_quantized(quantized(compress_statistics=True)) is None
