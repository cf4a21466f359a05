"""Padded (GShard / DeepSpeed-MoE) dispatcher equals the reference when it drops the same."""

import pytest
import torch

from xmoe.config import load_config
from xmoe.moe.layer import MoELayer

BASE = ["model.hidden=32", "moe.expert_hidden=16"]


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["moe.capacity_factor=0.6", "moe.top_k=3"],
        ["moe.capacity_factor=2.0", "moe.activation=gelu"],
    ],
)
def test_padded_matches_reference(overrides):
    torch.manual_seed(0)
    ref = MoELayer(load_config("tiny", [*BASE, *overrides])).double()
    pad = MoELayer(load_config("tiny", [*BASE, *overrides, "moe.dispatcher=padded"])).double()
    pad.load_state_dict(ref.state_dict())
    x = torch.randn(40, 32, dtype=torch.float64)
    g = torch.randn(40, 32, dtype=torch.float64)
    outs = []
    for layer in (ref, pad):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        outs.append((y, torch.autograd.grad(y, [xi, *layer.parameters()], g)))
    (y_ref, g_ref), (y, grads) = outs
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    for name, a, b in zip(["x"] + [n for n, _ in ref.named_parameters()], grads, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    st = pad.last_stats["dispatcher"]
    # every expert padded to the same capacity: rows = E * C
    assert st["rows"] == 8 * st["capacity"]
    if not overrides:
        assert st["capacity"] == int(pad.last_stats["tokens_per_expert"].max())
