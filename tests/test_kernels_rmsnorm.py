"""RMSNorm kernels against the unfused formula the model used before them."""

import pytest
import torch
import triton_interp

from xmoe.kernels.rmsnorm import rms_norm, rmsnorm_bwd_torch, rmsnorm_fwd_torch

test_in_interpreter_process = triton_interp.child_process_test(__file__)

# (T, D): D not a power of two (masked columns); more rows than the interpreter's four
# backward programs (each sums several rows into its weight-gradient partial); one row;
# no rows
SHAPES = [(37, 40), (300, 24), (5, 128), (1, 16), (0, 32)]


def _unfused(x, w, eps):
    xf = x.float() if x.dtype != torch.float64 else x
    xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) * w


@pytest.mark.parametrize("use_kernels", [True, False])
@pytest.mark.parametrize("T,D", SHAPES)
def test_rms_norm_matches_unfused_autograd(interpreter, monkeypatch, use_kernels, T, D):
    if not use_kernels:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    g = torch.Generator().manual_seed(T * 100 + D)
    x = (3 * torch.randn(2, T, D, generator=g)).requires_grad_()  # leading dims flatten
    w = (1 + torch.randn(D, generator=g)).requires_grad_()
    gy = torch.randn(2, T, D, generator=g)
    got = rms_norm(x, w, 1e-6)
    gx, gw = torch.autograd.grad(got, [x, w], gy)
    want = _unfused(x, w, 1e-6)
    wx, ww = torch.autograd.grad(want, [x, w], gy)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, wx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, ww, rtol=1e-5, atol=1e-5)


def test_torch_reference_is_exact_in_fp64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(33, 20, generator=g, dtype=torch.float64)
    w = torch.randn(20, generator=g, dtype=torch.float64)
    gy = torch.randn(33, 20, generator=g, dtype=torch.float64)
    y, rstd = rmsnorm_fwd_torch(x, w, 1e-6)
    dx, dw = rmsnorm_bwd_torch(gy, x, w, rstd)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = _unfused(xr, wr, 1e-6)
    want.backward(gy)
    torch.testing.assert_close(y, want.detach(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(dx, xr.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, wr.grad, rtol=1e-12, atol=1e-12)


def test_bf16_rounds_like_the_unfused_module():
    """In bf16 the normalised row is rounded before the weight scales it, as before."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 48, generator=g).bfloat16()
    w = (1 + torch.randn(48, generator=g)).bfloat16()
    torch.testing.assert_close(rms_norm(x, w, 1e-6), _unfused(x, w, 1e-6), rtol=0, atol=0)


def test_keeps_only_input_weight_and_rstd(interpreter):
    x = torch.randn(10, 64, requires_grad=True)
    w = torch.ones(64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rms_norm(x, w, 1e-6)
    assert [tuple(t.shape) for t in saved] == [(10, 64), (64,), (10,)]
    assert saved[0].data_ptr() == x.data_ptr()
