"""The fused decoder kernels against the eager modules they replace: under Triton's CPU
interpreter here (in a subprocess: TRITON_INTERPRET must be set before Triton is imported), and in
bf16 on a GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from app.inference.decoder import _rotate
from app.inference.fused_ops import act_and_mul, activation_kind, add_rms_norm, rotary_write_kv

REPO = Path(__file__).resolve().parents[2]


def check_against_eager(device: str, dtype: torch.dtype, atol: float) -> None:
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    # Residual add + RMSNorm, Llama's and Gemma's, with and without the add.
    for norm in (LlamaRMSNorm(96, eps=1e-5), Gemma2RMSNorm(96, eps=1e-6)):
        norm = norm.to(device, dtype)
        with torch.no_grad():
            norm.weight.copy_(rand(96))
        x, add = rand(5, 96), rand(5, 96)
        eps = getattr(norm, "variance_epsilon", None) or norm.eps
        unit_offset = isinstance(norm, Gemma2RMSNorm)
        summed, out = add_rms_norm(x, add, norm.weight, eps, unit_offset)
        torch.testing.assert_close(summed, x + add, atol=0, rtol=0)
        torch.testing.assert_close(out, norm(x + add), atol=atol, rtol=0)
        same, out = add_rms_norm(x, None, norm.weight, eps, unit_offset)
        assert same is x
        torch.testing.assert_close(out, norm(x), atol=atol, rtol=0)

    # Rotary (whole head and partial) with the cache write; one token skipped (slot -1).
    for dim, rot in ((32, 32), (48, 32)):
        tokens, heads, kv_heads, page = 4, 4, 2, 16
        qkv = rand(tokens, (heads + 2 * kv_heads) * dim)
        q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        q, k, v = (t.view(tokens, -1, dim) for t in (q, k, v))
        table = rand(2, 64, rot)
        positions = torch.tensor([0, 5, 17, 63], device=device)
        slots = torch.tensor([3, 20, -1, 33], device=device)
        k_cache = torch.zeros(4, page, kv_heads, dim, device=device, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)
        q_rot = rotary_write_kv(q, k, v, table, positions, k_cache, v_cache, slots)
        cos, sin = table[:, positions].unsqueeze(2)
        torch.testing.assert_close(q_rot, _rotate(q, cos, sin), atol=atol, rtol=0)
        k_rot = _rotate(k, cos, sin)
        for token, slot in enumerate(slots.tolist()):
            if slot < 0:
                continue
            torch.testing.assert_close(k_cache[slot // page, slot % page], k_rot[token], atol=atol, rtol=0)
            torch.testing.assert_close(v_cache[slot // page, slot % page], v[token], atol=0, rtol=0)
        assert int((k_cache != 0).any(-1).any(-1).sum()) == 3  # nothing written for the skipped token

    # act(gate) * up, SiLU and tanh GELU, over an uneven width.
    for name in ("silu", "gelu_pytorch_tanh"):
        act = ACT2FN[name]
        gate_up = rand(3, 2 * 1500)
        gate, up = gate_up.chunk(2, dim=-1)
        torch.testing.assert_close(
            act_and_mul(gate_up, activation_kind(act)), act(gate) * up, atol=atol, rtol=0
        )


def test_kernels_under_the_interpreter_equal_the_eager_modules():
    code = "import torch; from tests.unit.test_fused_ops import check_against_eager as c; "
    code += "c('cpu', torch.float32, 1e-5)"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


def test_activations_of_the_served_families_have_a_kernel():
    assert activation_kind(ACT2FN["silu"]) == 0 and activation_kind(ACT2FN["gelu_pytorch_tanh"]) == 1
    assert activation_kind(ACT2FN["relu"]) is None  # the decoder runs the module itself


@pytest.mark.gpu
def test_kernels_on_the_gpu_equal_the_eager_modules_in_bf16():
    # bf16: one rounding step apart at most (the eager ops' fp32 sums run in another order).
    check_against_eager("cuda", torch.bfloat16, 0.07)
