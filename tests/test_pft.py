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
    # (pft-only settings are left out of it)
    shared = [o for o in overrides if not o.startswith("moe.recompute_permute")]
    ref_overrides = [*BASE, *shared, "moe.dispatcher=reference", "moe.grouped_gemm=loop"]
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
    "dropless_recompute": ["moe.recompute_permute=true"],
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


@pytest.mark.parametrize("case", ["dropless", "dropping"])
def test_shared_experts_are_issued_before_the_host_wait(case, monkeypatch):
    """The dispatch issues the shared experts once, before it blocks on the counts
    (dropping on one rank: a host sync) or, with nothing to wait for (dropless), before
    its permute; the output is unchanged."""
    import xmoe.moe.pft as pft_mod

    events = []
    real_to_host = pft_mod._to_host_async

    def to_host(counts):
        wait = real_to_host(counts)
        return lambda: events.append("host wait") or wait()

    monkeypatch.setattr(pft_mod, "_to_host_async", to_host)
    for name in ("permute", "permute_with_weights"):  # (the latter: dropless, weights folded)
        real = getattr(pft_mod, name)
        monkeypatch.setattr(
            pft_mod, name, lambda *a, real=real, **k: events.append("permute") or real(*a, **k)
        )
    cf = "0.6" if case == "dropping" else "null"
    ref, pft = _pair(["moe.num_shared_experts=2", f"moe.capacity_factor={cf}"], torch.float64)
    shared_forward = pft.shared.forward
    pft.shared.forward = lambda x: events.append("shared") or shared_forward(x)
    x = torch.randn(12, 32, dtype=torch.float64)
    torch.testing.assert_close(pft(x), ref(x), rtol=1e-10, atol=1e-12)
    expected = ["shared", "host wait", "permute"] if case == "dropping" else ["shared", "permute"]
    assert events == expected


def _saved_row_buffers(layer, x, g) -> int:
    """How many distinct [rows, D] buffers the layer keeps for backward (then runs it)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x.clone().requires_grad_())
    rows = int(layer.last_stats["dispatcher"]["rows"])
    y.backward(g)
    return len({t.data_ptr() for t in saved if tuple(t.shape) == (rows, x.shape[1])})


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("capacity", ["null", "0.6"])
def test_recompute_permute_keeps_no_rows_and_matches_reference(activation, capacity):
    """moe.recompute_permute: the experts' gathered input is rebuilt in backward, so no
    [rows, D] buffer is kept; outputs and gradients still match the reference (fp32,
    torch._grouped_mm on the CPU, the path that honours it)."""
    over = [
        f"moe.activation={activation}",
        f"moe.capacity_factor={capacity}",
        "moe.num_shared_experts=0",
        "moe.grouped_gemm=torch",
    ]
    ref, pft = _compare(
        [*over, "moe.recompute_permute=true"], 40, torch.float32, rtol=1e-4, atol=1e-5
    )
    x, g = torch.randn(40, 32), torch.randn(40, 32)
    assert _saved_row_buffers(pft, x, g) == 0
    keep = MoELayer(load_config("tiny", [*BASE, *over, "moe.dispatcher=pft"]))
    keep.load_state_dict(pft.state_dict())
    assert _saved_row_buffers(keep, x, g) == 1  # the same rows, kept


def test_recompute_permute_is_refused_where_it_cannot_apply():
    from xmoe.config import ConfigError

    for over in (["parallel.ep=2"], ["moe.dispatcher=rbd"]):
        with pytest.raises(ConfigError, match="moe.recompute_permute"):
            load_config("tiny", ["moe.recompute_permute=true", *over])
