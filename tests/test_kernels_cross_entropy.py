"""The fused LM head + cross-entropy against the unfused head and F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F
import triton_interp

from xmoe.kernels.cross_entropy import ce_rows, ce_rows_torch, linear_cross_entropy

test_in_interpreter_process = triton_interp.child_process_test(__file__)


def _targets(N, V, g):
    t = torch.randint(0, V, (N,), generator=g)
    if N >= 2:
        t[0], t[-1] = 0, V - 1  # the first and last vocabulary entries
    return t


# V not a multiple of the interpreter's 16-wide blocks, and one that is; one row
@pytest.mark.parametrize("N,V", [(7, 37), (5, 64), (1, 3)])
def test_ce_rows_kernel_matches_reference(interpreter, N, V):
    g = torch.Generator().manual_seed(N * V)
    x = 4 * torch.randn(N, V, generator=g)
    t = _targets(N, V, g)
    want_loss, want_grad = ce_rows_torch(x, t, 0.25)
    got_loss, got_grad = ce_rows(x.clone(), t, 0.25)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(want_loss, F.cross_entropy(x, t, reduction="none"))


def test_ce_rows_kernel_with_no_rows(interpreter):
    loss, grad = ce_rows(torch.empty(0, 37), torch.empty(0, dtype=torch.int64), 1.0)
    assert loss.shape == (0,) and grad.shape == (0, 37)


def _unfused(h, w, t, scale):
    logits = h @ w.t()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, t, reduction="sum") * scale


@pytest.mark.parametrize("use_kernels", [True, False])
@pytest.mark.parametrize("rows", [3, 10, 64])  # several chunks, one exact, one oversized
def test_linear_cross_entropy_matches_unfused_head(interpreter, monkeypatch, use_kernels, rows):
    if not use_kernels:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    g = torch.Generator().manual_seed(rows)
    T, D, V = 10, 12, 37
    h = torch.randn(T, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    t = _targets(T, V, g)
    got = linear_cross_entropy(h, w, t, 1 / T, rows=rows)
    want = _unfused(h, w, t, 1 / T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the incoming gradient scales both (as DeepSpeed's 1 / accumulation steps does)
    got_g = torch.autograd.grad(2.5 * got, [h, w])
    want_g = torch.autograd.grad(2.5 * want, [h, w])
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_fp64_and_without_grad():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(21, 8, generator=g, dtype=torch.float64, requires_grad=True)
    t = _targets(9, 21, g)
    got = linear_cross_entropy(h, w, t, 1 / 9, rows=4)
    want = _unfused(h, w, t, 1 / 9)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, [h, w]), torch.autograd.grad(want, [h, w])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t, 1 / 9, rows=4), want.detach())
    # only the weight trains (a frozen trunk): no input gradient is made
    frozen = h.detach()
    (gw,) = torch.autograd.grad(linear_cross_entropy(frozen, w, t, 1 / 9), [w])
    torch.testing.assert_close(gw, torch.autograd.grad(_unfused(frozen, w, t, 1 / 9), [w])[0])


def test_keeps_no_logits_for_backward():
    """Saved for backward: the two gradients only, never anything of size [T, V]."""
    T, D, V = 16, 8, 300
    h = torch.randn(T, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = linear_cross_entropy(h, w, torch.randint(0, V, (T,)), 1 / T, rows=4)
    assert sorted(tuple(s.shape) for s in saved) == [(T, D), (V, D)]
    loss.backward()
