"""The fused softmax/top-k/loss-sums router kernel against the plain torch router ops."""

import pytest
import torch
import triton_interp

from xmoe.kernels.router_topk import softmax_topk, softmax_topk_torch

test_in_interpreter_process = triton_interp.child_process_test(__file__)

# (T, E, k): E not a power of two (masked experts), k = E, k = 1, more tokens than one
# block of each program (several partial sums), a single token
CASES = [(37, 12, 3), (20, 4, 4), (9, 8, 1), (300, 16, 6), (1, 64, 6)]


def _loss(top, g, uses=(True, True, True)):
    """A scalar that reaches the logits through the differentiable outputs in `uses`
    (the weights, the probability sums, the squared-lse sum)."""
    loss = (top.weights_TK.double() * g[0]).sum() if uses[0] else 0.0
    if uses[1]:
        loss = loss + (top.probs_sum_E * g[1]).sum()
    if uses[2]:
        loss = loss + top.lse_sq_sum * g[2]
    return loss


def _outputs(top):
    return [top.topk_probs_TK, top.weights_TK, top.probs_sum_E, top.lse_sq_sum]


@pytest.mark.parametrize("uses", [(True, True, True), (True, False, False), (False, True, True)])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("T,E,k", CASES)
def test_fused_router_matches_torch_ops(interpreter, T, E, k, renormalize, uses):
    """Outputs and the logits' gradient, through every subset of the differentiable
    outputs the router uses (an unused sum sends no gradient to the kernel)."""
    gen = torch.Generator().manual_seed(T * 100 + E + k)
    logits = (2 * torch.randn(T, E, generator=gen)).requires_grad_()
    g = (torch.randn(T, k, generator=gen), torch.randn(E, generator=gen), torch.randn(()))
    got = softmax_topk(logits, k, renormalize)
    (dl,) = torch.autograd.grad(_loss(got, g, uses), [logits])
    ref_logits = logits.detach().clone().requires_grad_()
    want = softmax_topk_torch(ref_logits, k, renormalize)
    (dl_ref,) = torch.autograd.grad(_loss(want, g, uses), [ref_logits])
    assert torch.equal(got.ids_TK, want.ids_TK)  # the same experts, largest first
    assert torch.equal(got.counts_E, want.counts_E)
    for a, b in zip(_outputs(got), _outputs(want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dl, dl_ref, rtol=1e-5, atol=1e-6)


def test_weights_in_the_routers_dtype(interpreter):
    """The weights come out in the asked dtype, rounded from the fp32 weights, and their
    gradient reaches the logits as the fp32 weights' would."""
    gen = torch.Generator().manual_seed(5)
    logits = (2 * torch.randn(50, 16, generator=gen)).requires_grad_()
    g = torch.randn(50, 4, generator=gen).double()
    fp32 = softmax_topk(logits, 4, True)
    f64 = softmax_topk(logits, 4, True, torch.float64)
    assert f64.weights_TK.dtype == torch.float64
    torch.testing.assert_close(f64.weights_TK, fp32.weights_TK.double(), rtol=0, atol=0)
    (d64,) = torch.autograd.grad((f64.weights_TK * g).sum(), [logits])
    (d32,) = torch.autograd.grad((fp32.weights_TK.double() * g).sum(), [logits])
    torch.testing.assert_close(d64, d32)


def test_ties_go_to_the_lower_expert(interpreter):
    logits = torch.zeros(3, 8)  # every probability equal
    ids = softmax_topk(logits, 3, True).ids_TK
    assert ids.tolist() == [[0, 1, 2]] * 3


def test_refuses_non_fp32_logits():
    with pytest.raises(ValueError, match="fp32"):
        softmax_topk(torch.zeros(2, 4, dtype=torch.bfloat16), 2, True)
