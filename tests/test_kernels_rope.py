"""The fused RoPE-on-QKV kernel against the rotation written in plain torch."""

import pytest
import torch
import triton_interp

from xmoe.kernels.rope import rope_qkv, rope_qkv_torch
from xmoe.model.transformer import rope_tables

test_in_interpreter_process = triton_interp.child_process_test(__file__)


def _rotate(x_BHSE, cos_SF, sin_SF):
    """The textbook rotation of (first half, second half) pairs, per head."""
    x1, x2 = x_BHSE.chunk(2, dim=-1)
    return torch.cat((x1 * cos_SF - x2 * sin_SF, x2 * cos_SF + x1 * sin_SF), dim=-1)


# (B, S, H, Dh): Dh/2 not a power of two (masked channels), H not a power of two,
# one token, no tokens
SHAPES = [(2, 5, 3, 12), (1, 7, 4, 16), (1, 1, 1, 2), (0, 3, 2, 8)]


@pytest.mark.parametrize("use_kernels", [True, False])
@pytest.mark.parametrize("B,S,H,E", SHAPES)
def test_rope_qkv_matches_the_rotation(interpreter, monkeypatch, use_kernels, B, S, H, E):
    if not use_kernels:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    g = torch.Generator().manual_seed(B * 1000 + S * 10 + H)
    qkv = torch.randn(B, S, 3, H, E, generator=g, requires_grad=True)
    cos, sin = rope_tables(S, E, 10000.0, torch.device("cpu"))
    grads_out = [torch.randn(B, H, S, E, generator=g) for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in rope_qkv(qkv, cos, sin))
    # transposed gradients reach the backward kernel with [B, H, S, Dh]-major strides
    got = torch.autograd.grad([q, k, v], [qkv], grads_out)[0]
    qkv2 = qkv.detach().clone().requires_grad_()
    p = qkv2.permute(2, 0, 3, 1, 4)
    want = [_rotate(p[0], cos, sin), _rotate(p[1], cos, sin), p[2]]
    want_grad = torch.autograd.grad(want, [qkv2], grads_out)[0]
    for a, b in zip((q, k, v), want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want_grad, rtol=1e-5, atol=1e-6)


def test_bf16_rounds_once_like_the_reference():
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 6, 3, 2, 8, generator=g).bfloat16()
    cos, sin = rope_tables(6, 8, 10000.0, torch.device("cpu"))
    q, k, v = rope_qkv_torch(qkv, cos, sin)
    p = qkv.float().permute(2, 0, 1, 3, 4)  # [3, B, S, H, Dh]
    c, s_ = cos[:, None, :], sin[:, None, :]
    torch.testing.assert_close(q, _rotate(p[0], c, s_).bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(k, _rotate(p[1], c, s_).bfloat16(), rtol=0, atol=0)
    assert torch.equal(v, qkv[:, :, 2])


def test_odd_head_dim_is_refused():
    with pytest.raises(ValueError, match="must be even"):
        rope_qkv(torch.zeros(1, 1, 3, 1, 5), torch.zeros(1, 2), torch.zeros(1, 2))
