"""The fused LoRA dropout + shrink kernels (worker/lora_dropout.py) against PyTorch's autograd on
the same mask: forward, input gradient and weight gradient; the mask keeps 1 - p of the elements,
independently of its neighbours and of other seeds, and the checkpointed recompute draws it again
identically."""

import pytest
import torch

from worker.lora_dropout import dropout_shrink, keep_threshold

pytestmark = pytest.mark.gpu


def _mask(shape, p, seed):
    """The kept elements of a call with this seed, read back through the kernel itself: x of ones
    times one-hot weight rows gives the mask of those columns."""
    rows, cols = shape
    ones = torch.ones(rows, cols, device="cuda", dtype=torch.bfloat16)
    mask = torch.empty(rows, cols, device="cuda")
    for start in range(0, cols, 16):
        picked = torch.arange(start, min(cols, start + 16), device="cuda")
        weight = torch.zeros(16, cols, device="cuda")
        weight[torch.arange(len(picked)), picked] = 1.0
        out = dropout_shrink(ones, weight, p, seed)
        mask[:, picked] = (out[:, : len(picked)] != 0).float()
    return mask


@pytest.mark.parametrize(
    "rows,cols,rank,p",
    [(300, 2048, 16, 0.05), (1000, 200, 8, 0.3), (77, 5632, 64, 0.1)],
)
def test_forward_and_gradients_equal_autograd_on_the_same_mask(rows, cols, rank, p):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, cols, device="cuda", generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(rank, cols, device="cuda", generator=gen) * 0.05).requires_grad_()
    seed = 4321
    mask = _mask((rows, cols), p, seed)
    _, scale = keep_threshold(p)
    assert abs(scale - 1 / (1 - p)) < 1e-4

    out = dropout_shrink(x, weight, p, seed)
    x_ref, weight_ref = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = (x_ref.float() * mask * scale) @ weight_ref.t()
    grad = torch.randn(rows, rank, device="cuda", generator=gen)
    (out.float() * grad).sum().backward()
    (ref * grad).sum().backward()

    assert out.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    for got, want in ((out, ref), (x.grad, x_ref.grad), (weight.grad, weight_ref.grad)):
        # bf16 operands against fp32 ones: an error of bf16's rounding, over the whole tensor
        assert (got.float() - want.float()).norm() / want.float().norm() < 1e-2


def test_the_mask_keeps_one_minus_p_and_changes_with_the_seed():
    p, shape = 0.05, (2048, 2048)
    first, second = _mask(shape, p, 1), _mask(shape, p, 2)
    assert abs(first.mean().item() - (1 - p)) < 2e-3
    dropped = 1 - first
    for neighbours in (dropped[:, 1:] * dropped[:, :-1], dropped[1:] * dropped[:-1]):
        assert abs(neighbours.mean().item() - p * p) < 1e-3  # independent of the next element
    differing = (first != second).float().mean().item()
    assert abs(differing - 2 * p * (1 - p)) < 3e-3  # independent draws


def test_the_checkpointed_recompute_draws_the_forward_mask():
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(512, 1024, device="cuda", generator=gen).bfloat16()
    weight = torch.randn(16, 1024, device="cuda", generator=gen).requires_grad_()

    def loss():
        return dropout_shrink(torch.relu(x), weight, 0.2).float().square().sum()

    torch.manual_seed(7)
    plain = loss()
    plain.backward()
    expected, weight.grad = weight.grad.clone(), None
    torch.manual_seed(7)
    checkpointed = torch.utils.checkpoint.checkpoint(loss, use_reentrant=False)
    checkpointed.backward()
    assert checkpointed.item() == plain.item()
    torch.testing.assert_close(weight.grad, expected, rtol=0, atol=0)
