"""The experts' activation with the combine weight folded in, against plain autograd."""

import pytest
import torch
import torch.nn.functional as F
import triton_interp

from xmoe.kernels.activation import scaled_act_bwd_torch, scaled_activation

test_in_interpreter_process = triton_interp.child_process_test(__file__)

# (R, F): F not a power of two (column masks), F > the backward's 128-column block
# (several passes accumulate the weight gradient), a single row, no rows
SHAPES = [(37, 40), (9, 200), (1, 16), (0, 24)]


def _plain(h, h3, w):
    a = F.gelu(h) if h3 is None else F.silu(h) * h3
    return w[:, None] * a


@pytest.mark.parametrize("use_kernels", [True, False])
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
@pytest.mark.parametrize("R,Fh", SHAPES)
def test_scaled_activation_matches_autograd(interpreter, monkeypatch, use_kernels, act, R, Fh):
    if not use_kernels:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    g = torch.Generator().manual_seed(R * 1000 + Fh)
    h = (2 * torch.randn(R, Fh, generator=g)).requires_grad_()
    h3 = torch.randn(R, Fh, generator=g).requires_grad_() if act == "swiglu" else None
    w = torch.rand(R, generator=g).requires_grad_()
    gy = torch.randn(R, Fh, generator=g)
    got = scaled_activation(h, h3, w)
    grads = torch.autograd.grad(got, [t for t in (h, h3, w) if t is not None], gy)
    want = _plain(h, h3, w)
    want_grads = torch.autograd.grad(want, [t for t in (h, h3, w) if t is not None], gy)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_torch_reference_in_fp64(act):
    """The reference's closed-form derivatives are exact (fp64, against autograd)."""
    g = torch.Generator().manual_seed(3)
    h = 3 * torch.randn(50, 33, generator=g, dtype=torch.float64)
    h3 = torch.randn(50, 33, generator=g, dtype=torch.float64) if act == "swiglu" else None
    w = torch.rand(50, generator=g, dtype=torch.float64)
    gy = torch.randn(50, 33, generator=g, dtype=torch.float64)
    ins = [t.clone().requires_grad_() for t in (h, h3, w) if t is not None]
    want = torch.autograd.grad(_plain(ins[0], ins[1] if h3 is not None else None, ins[-1]), ins, gy)
    dh, dh3, dw = scaled_act_bwd_torch(h, h3, w, gy)
    got = [dh, dh3, dw] if h3 is not None else [dh, dw]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_keeps_only_its_inputs(interpreter):
    """Saved for backward: h, h3 and w; not the activation nor its product."""
    h = torch.randn(20, 48, requires_grad=True)
    h3 = torch.randn(20, 48, requires_grad=True)
    w = torch.rand(20, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        scaled_activation(h, h3, w)
    assert [s.data_ptr() for s in saved] == [h.data_ptr(), h3.data_ptr(), w.data_ptr()]


def test_gelu_is_fp32_accurate_over_the_whole_range(interpreter):
    """The fp32 kernels' GELU (Phi from a fitted erfc, no erf) against the exact function
    in fp64, from the far negative tail (where 1 + erf cancels) to the far positive one:
    Phi within 3e-5 relative, and the activation's gradient within 1e-6 absolute."""
    from xmoe.kernels.activation import scaled_act_bwd, scaled_act_fwd

    h = torch.linspace(-13.0, 13.0, 26001).reshape(-1, 81)  # odd width: masked columns
    w = torch.ones(h.shape[0])
    h64 = h.double()
    phi = 0.5 * torch.special.erfc(-h64 / 2**0.5)
    a = scaled_act_fwd(h, None, w).double()
    small = h.abs() < 1e-3  # a / h loses Phi's digits where h itself is tiny
    rel = ((a / h64 - phi) / phi)[~small].abs().max().item()
    assert rel < 3e-5, rel
    dh, _, dw = scaled_act_bwd(h, None, w, torch.ones_like(h))
    want = phi + h64 * torch.exp(-0.5 * h64**2) / (2 * torch.pi) ** 0.5
    assert (dh.double() - want).abs().max().item() < 1e-6
    torch.testing.assert_close(dw.double(), (h64 * phi).sum(1), rtol=1e-5, atol=1e-5)
