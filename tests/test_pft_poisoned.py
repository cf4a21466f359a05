"""PFT and the grouped GEMM never read memory nothing wrote, in fp32 and fp64.

Every uninitialised float (torch.empty and friends) is filled with NaN while these tests
run, so a kernel that leaves part of an output unwritten (padding rows, experts with zero
rows, K-tails, half of each element) or consumes masked lanes it never loaded turns the
result NaN instead of passing by luck. All kernels run in the Triton interpreter; the
reference side never runs a kernel under test (reference dispatcher, per-expert loop).
"""

import pytest
import torch
import triton_interp

from xmoe.config import load_config
from xmoe.kernels.grouped_gemm import grouped_mm
from xmoe.moe.layer import MoELayer

test_in_interpreter_process = triton_interp.child_process_test(__file__)

TOL = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-5},
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
}
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
BASE = ["model.hidden=32", "moe.expert_hidden=16"]
# (overrides, tokens); with 16 experts and 3 tokens x top-2 at least 10 experts get no rows
LAYER_CASES = {
    "dropless": ([], 40),
    "dropping": (["moe.capacity_factor=0.6", "moe.num_shared_experts=2"], 40),
    "experts_with_zero_rows": (["moe.num_experts=16"], 3),
}


@pytest.fixture
def poisoned():
    """Uninitialised floats are NaN for the duration of the test."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.isnan(torch.empty(4, dtype=torch.float64)).all()
    yield
    torch.utils.deterministic.fill_uninitialized_memory = was_fill
    torch.use_deterministic_algorithms(was_on, warn_only=was_warn)


def _layer(overrides: list[str], dtype: torch.dtype) -> MoELayer:
    return MoELayer(load_config("tiny", overrides)).to(dtype)


def _run(layer, x_TD, g_TD):
    x_TD = x_TD.clone().requires_grad_()
    y_TD = layer(x_TD)
    grads = torch.autograd.grad(y_TD, [x_TD, *layer.parameters()], g_TD, allow_unused=True)
    return y_TD, grads


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_pft_triton_matches_reference_on_poisoned_memory(interpreter, poisoned, case, dtype):
    dtype = DTYPES[dtype]
    overrides, T = LAYER_CASES[case]
    torch.manual_seed(0)
    cfg = [*BASE, *overrides]
    ref = _layer([*cfg, "moe.dispatcher=reference", "moe.grouped_gemm=loop"], dtype)
    pft = _layer([*cfg, "moe.dispatcher=pft", "moe.grouped_gemm=triton"], dtype)
    pft.load_state_dict(ref.state_dict())
    x_TD = torch.randn(T, 32, dtype=dtype)
    g_TD = torch.randn(T, 32, dtype=dtype)
    y_ref, g_ref = _run(ref, x_TD, g_TD)
    y, grads = _run(pft, x_TD, g_TD)
    assert not torch.isnan(y_ref).any()
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    names = ["x"] + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, grads, g_ref):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, msg=name, **TOL[dtype])
    if case == "dropping":
        assert pft.last_stats["dropped_fraction"] > 0


# K=40 and N=24 are not multiples of the interpreter's 16-wide tiles: K- and N-tails
GEMM_COUNTS = {
    "ragged": [5, 0, 17, 3],
    "tile_edges": [16, 33, 0, 15],
    "all_on_one": [0, 0, 29, 0],
}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(GEMM_COUNTS))
def test_grouped_gemm_on_poisoned_memory(interpreter, poisoned, case, dtype):
    dtype = DTYPES[dtype]
    counts = GEMM_COUNTS[case]
    E, R, K, N = len(counts), sum(counts), 40, 24
    g = torch.Generator().manual_seed(R)
    x_RK = torch.randn(R, K, generator=g, dtype=dtype)
    w_ENK = torch.randn(E, N, K, generator=g, dtype=dtype)
    gy_RN = torch.randn(R, N, generator=g, dtype=dtype)
    outs = []
    for impl in ("triton", "loop"):
        x = x_RK.clone().requires_grad_()
        w = w_ENK.clone().requires_grad_()
        y = grouped_mm(x, w.transpose(1, 2), counts, impl)
        (y * gy_RN).sum().backward()
        outs.append((y.detach(), x.grad, w.grad))
    for name, got, want in zip(("y", "dx", "dw"), *outs):
        torch.testing.assert_close(got, want, msg=name, **TOL[dtype])


def test_grouped_gemm_rejects_rows_outside_every_expert(interpreter):
    x_RK = torch.randn(10, 16)
    w_EKN = torch.randn(2, 16, 16)
    with pytest.raises(ValueError, match="sum to 7 rows but x_RK has 10"):
        grouped_mm(x_RK, w_EKN, [3, 4], "triton")
