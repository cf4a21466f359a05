"""PFT against the reference dispatcher on one rank: outputs and every gradient."""

import pytest
import torch
import triton_interp

from xmoe.config import load_config
from xmoe.moe.layer import MoELayer

BASE = ["model.hidden=32", "moe.expert_hidden=16"]
CASES = {
    "dropless": [],
    "dropping": ["moe.capacity_factor=0.6", "moe.num_shared_experts=2"],
    "gelu_topk_equals_experts": ["moe.activation=gelu", "moe.num_experts=4", "moe.top_k=4"],
    "single_token": ["moe.top_k=3"],
    # the combine weights applied by the combine (kept expert outputs) instead of folded
    # into the experts' activation (the default)
    "dropless_unfolded": ["moe.fold_combine_weights=false"],
    "dropping_unfolded": ["moe.capacity_factor=0.6", "moe.fold_combine_weights=false"],
}


def _pair(overrides, dtype):
    torch.manual_seed(0)
    # the reference always runs the per-expert loop, so a grouped-GEMM bug cannot cancel out
    ref_overrides = [*BASE, *overrides, "moe.dispatcher=reference", "moe.grouped_gemm=loop"]
    ref = MoELayer(load_config("tiny", ref_overrides)).to(dtype)
    pft = MoELayer(load_config("tiny", [*BASE, *overrides, "moe.dispatcher=pft"])).to(dtype)
    pft.load_state_dict(ref.state_dict())
    return ref, pft


def _run(layer, x, g):
    x = x.clone().requires_grad_()
    y = layer(x)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], g, allow_unused=True)
    return y, grads


def _compare(overrides, T, dtype, **tol):
    ref, pft = _pair(overrides, dtype)
    x = torch.randn(T, 32, dtype=dtype)
    g = torch.randn(T, 32, dtype=dtype)
    y_ref, g_ref = _run(ref, x, g)
    y, grads = _run(pft, x, g)
    torch.testing.assert_close(y, y_ref, **tol)
    names = ["x"] + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, grads, g_ref):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, msg=name, **tol)
    return ref, pft


@pytest.mark.parametrize("case", list(CASES))
def test_pft_matches_reference(case):
    T = 1 if case == "single_token" else 40
    ref, pft = _compare(CASES[case], T, torch.float64, rtol=1e-10, atol=1e-12)
    if case == "dropping":
        assert pft.last_stats["dropped_fraction"] > 0
        assert pft.last_stats["dispatcher"]["rows"] < T * pft.cfg.moe.top_k


test_in_interpreter_process = triton_interp.child_process_test(__file__)


TRITON_CASES = {
    "dropping": ["moe.capacity_factor=0.8"],
    "dropless_gelu": ["moe.activation=gelu"],  # one rank, dropless: the sync-free path
    "dropping_unfolded": ["moe.capacity_factor=0.8", "moe.fold_combine_weights=false"],
}


@pytest.mark.parametrize("case", list(TRITON_CASES))
@pytest.mark.parametrize("grouped_gemm", ["triton", "torch"])
def test_pft_with_triton_kernels(monkeypatch, grouped_gemm, case):
    """The same comparison with every PFT kernel running in Triton (interpreter, fp32)."""
    if not triton_interp.READY:
        pytest.skip(
            "triton was imported without the interpreter: test_in_interpreter_process runs these"
        )
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _compare(
        [*TRITON_CASES[case], f"moe.grouped_gemm={grouped_gemm}"],
        24,
        torch.float32,
        rtol=1e-4,
        atol=1e-5,
    )


def test_overlap_shared_flag_is_exact_on_cpu():
    """moe.overlap_shared only moves the shared experts to a side stream on a GPU."""
    ref, pft = _pair(["moe.num_shared_experts=2"], torch.float64)
    pft.cfg.moe.overlap_shared = True
    x = torch.randn(12, 32, dtype=torch.float64)
    torch.testing.assert_close(pft(x), ref(x), rtol=1e-10, atol=1e-12)
