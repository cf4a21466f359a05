"""The fused softmax/top-k/loss-sums router kernel against the plain torch router ops."""

import pytest
import torch
import triton_interp

from xmoe.kernels.router_topk import softmax_topk, softmax_topk_torch

test_in_interpreter_process = triton_interp.child_process_test(__file__)

# (T, E, k): E not a power of two (masked experts), k = E, k = 1, more tokens than one
# block of each program (several partial sums), a single token
CASES = [(37, 12, 3), (20, 4, 4), (9, 8, 1), (300, 16, 6), (1, 64, 6)]


def _loss(out, g):
    """A scalar that reaches the logits through every differentiable output."""
    _ids, _p, w, psum, zsq, _cnt = out
    return (w * g[0]).sum() + (psum * g[1]).sum() + zsq * g[2]


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("T,E,k", CASES)
def test_fused_router_matches_torch_ops(interpreter, T, E, k, renormalize):
    gen = torch.Generator().manual_seed(T * 100 + E + k)
    logits = (2 * torch.randn(T, E, generator=gen)).requires_grad_()
    g = (torch.randn(T, k, generator=gen), torch.randn(E, generator=gen), torch.randn(()))
    got = softmax_topk(logits, k, renormalize)
    (dl,) = torch.autograd.grad(_loss(got, g), [logits])
    ref_logits = logits.detach().clone().requires_grad_()
    want = softmax_topk_torch(ref_logits, k, renormalize)
    (dl_ref,) = torch.autograd.grad(_loss(want, g), [ref_logits])
    assert torch.equal(got[0], want[0])  # the same experts, largest first
    assert torch.equal(got[5], want[5])  # counts
    for a, b in zip(got[1:5], want[1:5]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dl, dl_ref, rtol=1e-5, atol=1e-6)


def test_ties_go_to_the_lower_expert(interpreter):
    logits = torch.zeros(3, 8)  # every probability equal
    ids = softmax_topk(logits, 3, True)[0]
    assert ids.tolist() == [[0, 1, 2]] * 3


def test_refuses_non_fp32_logits():
    with pytest.raises(ValueError, match="fp32"):
        softmax_topk(torch.zeros(2, 4, dtype=torch.bfloat16), 2, True)
