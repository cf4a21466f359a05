"""Grouped GEMM: Triton kernel, torch._grouped_mm and the per-expert loop agree, fwd and bwd."""

import weakref

import pytest
import torch
import triton_interp

from xmoe.kernels.grouped_gemm import (
    DeviceCounts,
    grouped_mm,
    resolve_impl,
    torch_grouped_mm_supported,
)

test_in_interpreter_process = triton_interp.child_process_test(__file__)


COUNTS = {
    "ragged": [5, 0, 17, 3],
    "all_on_one": [0, 0, 29, 0],
    "single_row": [1],
    "empty": [0, 0, 0],
    "tile_edges": [16, 33, 15],
}


def _run(impl, x, w, counts, gy, transpose):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    w_EKN = w.transpose(1, 2) if transpose else w
    y = grouped_mm(x, w_EKN, counts, impl)
    (y * gy).sum().backward()
    return y.detach(), x.grad, w.grad


# K, N multiples of the interpreter's 16x16x16 tiles take the unmasked (EVEN_K/EVEN_N)
# loads, the others the masked ones; the backward runs both with K and N swapped
@pytest.mark.parametrize("KN", [(32, 48), (20, 37)], ids=["even", "ragged_kn"])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("case", list(COUNTS))
def test_impls_agree(interpreter, case, transpose, KN):
    counts = COUNTS[case]
    (K, N), E, R = KN, len(counts), sum(counts)
    g = torch.Generator().manual_seed(R + E)
    x = torch.randn(R, K, generator=g)
    w = torch.randn(E, N, K, generator=g) if transpose else torch.randn(E, K, N, generator=g)
    gy = torch.randn(R, N, generator=g)
    ref = _run("loop", x, w, counts, gy, transpose)
    impls = ["triton"] + (["torch"] if R and torch_grouped_mm_supported(x, w) else [])
    for impl in impls:
        for got, want in zip(_run(impl, x, w, counts, gy, transpose), ref):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # counts as a device tensor take the same path
    y = grouped_mm(x, w.transpose(1, 2) if transpose else w, torch.tensor(counts), "triton")
    torch.testing.assert_close(y, ref[0], atol=1e-4, rtol=1e-4)


def test_torch_grouped_mm_matches_loop_without_interpreter():
    counts = [3, 0, 9, 4]
    x = torch.randn(16, 32)
    w = torch.randn(4, 32, 16)
    gy = torch.randn(16, 16)
    assert torch_grouped_mm_supported(x, w)
    for got, want in zip(
        _run("torch", x, w, counts, gy, False), _run("loop", x, w, counts, gy, False)
    ):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_resolution_degrades_to_what_runs_here(monkeypatch):
    x, w = torch.randn(4, 32), torch.randn(2, 32, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_impl("auto", x, w) == "torch"
    assert resolve_impl("triton", x, w) == "loop"  # no GPU, no interpreter
    assert resolve_impl("torch", x, torch.randn(2, 32, 6)) == "loop"  # misaligned for _grouped_mm
    assert resolve_impl("auto", x.double(), w.double()) == "loop"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl("triton", x, w) == "triton"
    assert resolve_impl("auto", x.double(), w.double()) == "triton"
    with pytest.raises(ValueError, match="grouped GEMM"):
        resolve_impl("cutlass", x, w)


def test_device_counts_are_read_only_by_host_planned_impls():
    """`DeviceCounts`: `_grouped_mm` runs on the device offsets without reading the
    counts; the loop reads them once (one fetch, however often it iterates)."""
    counts = [3, 0, 9, 4]
    x, w, gy = torch.randn(16, 32), torch.randn(4, 32, 16), torch.randn(16, 16)
    fetched = []

    def make():
        offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
        read = offsets.tolist
        offsets.tolist = lambda: fetched.append(1) or read()  # the one host read
        return DeviceCounts(offsets)

    want = _run("loop", x, w, counts, gy, False)
    dc = make()
    for got, ref in zip(_run("torch", x, w, dc, gy, False), want):
        torch.testing.assert_close(got, ref)
    assert fetched == [] and len(dc) == 4 and not dc.fetched
    dc = make()
    for got, ref in zip(_run("loop", x, w, dc, gy, False), want):
        torch.testing.assert_close(got, ref)
    assert fetched == [1] and dc == counts and dc[2] == 9 and dc.fetched


class _Holder:
    """What a saved-tensor pack hook keeps instead of the tensor; notes its release."""

    def __init__(self, t: torch.Tensor, events: list, name: str | None) -> None:
        self.t = t
        if name is not None:
            weakref.finalize(self, events.append, f"{name} released")


def _backward_events(impl: str, monkeypatch) -> list[str]:
    """Order of events in backward: x's saved copy released, dx computed (dgrad)."""
    from xmoe.kernels import grouped_gemm_triton

    counts = [5, 0, 17, 3]
    g = torch.Generator().manual_seed(3)
    x_leaf = torch.randn(25, 32, generator=g, requires_grad=True)
    w = torch.randn(4, 48, 32, generator=g, requires_grad=True)
    events: list[str] = []
    x = x_leaf * 2  # an intermediate, like the activation feeding the second GEMM
    x_ptr, x_shape = x.data_ptr(), x.shape

    def pack(t):
        same = t.data_ptr() == x_ptr and t.shape == x_shape
        return _Holder(t, events, "x" if same else None)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.t):
        y = grouped_mm(x, w.transpose(1, 2), counts, impl)
    del x
    if impl == "torch":
        real = torch._grouped_mm

        def spy(a, b, offs=None):
            if b.dim() == 3 and a.shape[1] == y.shape[1]:
                events.append("dgrad")
            return real(a, b, offs=offs)

        monkeypatch.setattr(torch, "_grouped_mm", spy)
    else:
        real = grouped_gemm_triton.gmm_forward

        def spy(a, b, tiles, N):
            events.append("forward" if a.shape[1] == 32 else "dgrad")
            return real(a, b, tiles, N)

        monkeypatch.setattr(grouped_gemm_triton, "gmm_forward", spy)
    y.backward(torch.randn(y.shape, generator=g))
    return events


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_backward_frees_the_input_before_computing_its_gradient(impl, monkeypatch, request):
    """The weight's gradient is computed first and x released, so x and dx (same size:
    the [rows, F] activation at the second GEMM) are never both alive."""
    if impl == "triton":
        request.getfixturevalue("interpreter")
    events = _backward_events(impl, monkeypatch)
    assert events == ["x released", "dgrad"]


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_weight_gradient_comes_in_the_weights_layout(impl, request):
    """Experts store weights [E, out, in] and pass a transposed view: the gradient of that
    view is produced with the view's strides, so it reaches the parameter without a copy."""
    if impl == "triton":
        request.getfixturevalue("interpreter")
    counts = [5, 0, 17, 3]
    x = torch.randn(25, 32, requires_grad=True)
    w = torch.randn(4, 48, 32, requires_grad=True)  # [E, N, K]
    w_EKN = w.transpose(1, 2)
    strides = []
    w_EKN.register_hook(lambda g: strides.append(g.stride()))
    grouped_mm(x, w_EKN, counts, impl).backward(torch.randn(25, 48))
    assert strides == [w_EKN.stride()] and w.grad.is_contiguous()
