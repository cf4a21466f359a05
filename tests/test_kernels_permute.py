"""permute / unpermute / combine kernels against torch references and plain autograd."""

import pytest
import torch
import triton_interp
from kernel_cases import CASES, make_routing

from xmoe.kernels.combine import combine, row_dot, row_dot_torch
from xmoe.kernels.permute import (
    attach_gathered,
    gather_rows,
    gather_rows_torch,
    permute,
    permute_with_weights,
    scatter_rows,
    scatter_rows_torch,
    unpermute,
    unpermute_torch,
)
from xmoe.kernels.routing import routing_metadata

D = 24  # not a power of two: exercises the column masks


test_in_interpreter_process = triton_interp.child_process_test(__file__)


def _setup(T, K, E, drop, seed=0):
    ids_TK, keep_TK = make_routing(T, K, E, seed=seed, drop=drop)
    meta = routing_metadata(ids_TK, keep_TK, E)
    R = int(meta.counts_E.sum())
    g = torch.Generator().manual_seed(seed + 1)
    x_TD = torch.randn(T, D, generator=g)
    w_TK = torch.rand(T, K, generator=g)
    return meta, R, meta.src_slot_N[:R], x_TD, w_TK


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("name,T,K,E", CASES)
def test_kernels_match_references(interpreter, name, T, K, E, drop):
    meta, R, slot_R, x_TD, w_TK = _setup(T, K, E, drop)
    rows_RD = torch.randn(R, D)
    torch.testing.assert_close(gather_rows(x_TD, slot_R, K), gather_rows_torch(x_TD, slot_R, K))
    w_N = w_TK.reshape(-1)
    torch.testing.assert_close(
        gather_rows(x_TD, slot_R, K, w_N), gather_rows_torch(x_TD, slot_R, K, w_N)
    )
    # the scatter writes the rows the gather reads (every row below R is some assignment's)
    for w in (None, w_TK):
        wn = None if w is None else w.reshape(-1)
        want = gather_rows_torch(x_TD, slot_R, K, wn)
        torch.testing.assert_close(scatter_rows(x_TD, meta.dest_row_TK, R, w), want)
        torch.testing.assert_close(scatter_rows_torch(x_TD, meta.dest_row_TK, R, w), want)
    # unscaled rows with each row's weight beside them
    rows_w = gather_rows_torch(x_TD, slot_R, K), w_TK.reshape(-1)[slot_R]
    for fn in (scatter_rows, scatter_rows_torch):
        for got, want in zip(fn(x_TD, meta.dest_row_TK, R, w_TK, weights_out=True), rows_w):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    for w in (None, w_TK):
        torch.testing.assert_close(
            unpermute(rows_RD, meta.dest_row_TK, w), unpermute_torch(rows_RD, meta.dest_row_TK, w)
        )
    torch.testing.assert_close(
        row_dot(x_TD, rows_RD, meta.dest_row_TK), row_dot_torch(x_TD, rows_RD, meta.dest_row_TK)
    )


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("name,T,K,E", CASES)
def test_scatter_into_a_buffer_for_every_assignment(interpreter, name, T, K, E, drop):
    """Copying into a [T*K, D] buffer before the host knows the kept count writes exactly
    the first n rows (the rest keep their NaN poison), and `attach_gathered` has
    permute's grads."""
    meta, R, slot_R, x_TD, _ = _setup(T, K, E, drop, seed=5)
    torch.manual_seed(0)
    empty = torch.empty

    def poisoned(*a, **k):
        return empty(*a, **k).fill_(float("nan"))

    torch.empty = poisoned
    try:
        rows_ND = scatter_rows(x_TD, meta.dest_row_TK, T * K)
    finally:
        torch.empty = empty
    assert rows_ND.shape == (T * K, D)
    torch.testing.assert_close(rows_ND[:R], gather_rows_torch(x_TD, slot_R, K))
    assert rows_ND[R:].isnan().all()
    x1 = x_TD.clone().requires_grad_()
    x2 = x_TD.clone().requires_grad_()
    gy = torch.randn(R, D)
    attach_gathered(x1, rows_ND[:R], meta.dest_row_TK).backward(gy)
    permute(x2, meta.dest_row_TK, R).backward(gy)
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("use_kernels", [True, False])
@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("name,T,K,E", CASES)
def test_permute_with_weights_has_the_gradients_of_its_parts(
    interpreter, monkeypatch, use_kernels, name, T, K, E, drop
):
    """(rows, row weights) from one kernel: values and the gradients of x and of the
    weights equal `permute` plus indexing the weights by each row's assignment."""
    if not use_kernels:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    meta, R, slot_R, x_TD, w_TK = _setup(T, K, E, drop, seed=11)
    g = torch.Generator().manual_seed(12)
    gx, gw = torch.randn(R, D, generator=g), torch.randn(R, generator=g)
    x1, w1 = x_TD.clone().requires_grad_(), w_TK.clone().requires_grad_()
    rows, w_R = permute_with_weights(x1, w1, meta.dest_row_TK, R)
    ((rows * gx).sum() + (w_R * gw).sum()).backward()
    x2, w2 = x_TD.clone().requires_grad_(), w_TK.clone().requires_grad_()
    rows2, w_R2 = permute(x2, meta.dest_row_TK, R), w2.reshape(-1)[slot_R]
    ((rows2 * gx).sum() + (w_R2 * gw).sum()).backward()
    for a, b in ((rows, rows2), (w_R, w_R2), (x1.grad, x2.grad), (w1.grad, w2.grad)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("use_kernels", [True, False], ids=["triton", "torch"])
def test_permute_with_weights_of_no_rows(interpreter, monkeypatch, use_kernels):
    """Tokens whose every assignment is dropped (a receiver's empty pilot slots): no rows,
    and zero gradients for x and the weights."""
    if not use_kernels:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(5, D, requires_grad=True)
    w = torch.rand(5, 3, requires_grad=True)
    rows, w_R = permute_with_weights(x, w, torch.full((5, 3), -1), 0)
    assert rows.shape == (0, D) and w_R.shape == (0,)
    (rows.sum() + w_R.sum()).backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))


def test_scatter_never_writes_past_its_buffer(interpreter):
    """Rows named past the buffer (inconsistent metadata) are skipped, not written out
    of bounds; the rows inside it are the assignments' as usual."""
    meta, R, slot_R, x_TD, _ = _setup(16, 2, 4, drop=False)
    out = scatter_rows(x_TD, meta.dest_row_TK, R - 3)
    assert out.shape == (R - 3, D)
    torch.testing.assert_close(out, gather_rows_torch(x_TD, slot_R, 2)[: R - 3])


def _naive(x_TD, w_TK, ids_TK, keep_TK, expert_fn):
    """Dense formula: y_t = sum over kept k of w_tk * f_e(x_t), with autograd through it all."""
    T, K = ids_TK.shape
    y_TD = torch.zeros_like(x_TD)
    for k in range(K):
        out = expert_fn(x_TD, ids_TK[:, k])
        mask = keep_TK[:, k] if keep_TK is not None else torch.ones(T, dtype=torch.bool)
        y_TD = y_TD + (w_TK[:, k] * mask)[:, None] * out
    return y_TD


@pytest.mark.parametrize("fold", [False, True], ids=["weighted_combine", "weights_in_rows"])
@pytest.mark.parametrize("use_kernels", [True, False])
@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("name,T,K,E", CASES)
def test_permute_combine_autograd(interpreter, monkeypatch, use_kernels, name, T, K, E, drop, fold):
    """permute -> per-row expert scale -> combine equals the dense formula, values and grads
    (`fold`: the rows carry their weights and the combine sums them unweighted)."""
    if not use_kernels:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    ids_TK, keep_TK = make_routing(T, K, E, seed=7, drop=drop)
    meta = routing_metadata(ids_TK, keep_TK, E)
    R = int(meta.counts_E.sum())
    g = torch.Generator().manual_seed(8)
    x_TD = torch.randn(T, D, generator=g, requires_grad=True)
    w_TK = torch.rand(T, K, generator=g, requires_grad=True)
    scale_ED = torch.randn(E, D, generator=g, requires_grad=True)

    slot_R = meta.src_slot_N[:R]
    rows_RD = permute(x_TD, meta.dest_row_TK, R)
    expert_R = torch.repeat_interleave(torch.arange(E), meta.counts_E, output_size=R)
    out_RD = torch.tanh(rows_RD * scale_ED[expert_R])
    if fold:
        out_RD = out_RD * w_TK.reshape(-1)[slot_R][:, None]
        y_TD = combine(out_RD, None, meta.dest_row_TK)
    else:
        y_TD = combine(out_RD, w_TK, meta.dest_row_TK)

    x2 = x_TD.detach().clone().requires_grad_()
    w2 = w_TK.detach().clone().requires_grad_()
    s2 = scale_ED.detach().clone().requires_grad_()
    y2 = _naive(x2, w2, ids_TK, keep_TK, lambda x, e: torch.tanh(x * s2[e]))
    torch.testing.assert_close(y_TD, y2)

    gy = torch.randn(T, D, generator=g)
    (y_TD * gy).sum().backward()
    (y2 * gy).sum().backward()
    torch.testing.assert_close(x_TD.grad, x2.grad)
    torch.testing.assert_close(w_TK.grad, w2.grad)
    torch.testing.assert_close(scale_ED.grad, s2.grad)


def _saved_shapes(fn):
    """The shapes of the tensors autograd keeps for backward while `fn` runs, and its result."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.shape) or t, lambda t: t
    ):
        out = fn()
    return saved, out


def test_combine_keeps_no_input_copy(interpreter):
    """Only the expert outputs, weights and index tensors are saved for backward."""
    meta, R, slot_R, x_TD, w_TK = _setup(16, 2, 4, drop=False)
    out_RD = torch.randn(R, D, requires_grad=True)
    saved, _ = _saved_shapes(
        lambda: (
            combine(out_RD, w_TK.requires_grad_(), meta.dest_row_TK),
            permute(x_TD.requires_grad_(), meta.dest_row_TK, R),
        )
    )
    big = [s for s in saved if s.numel() >= R * D]
    assert big == [torch.Size([R, D])]  # the expert outputs, needed for the weight gradient


def test_unweighted_combine_keeps_only_the_rows_index(interpreter):
    """With the weights already in the rows, the combine keeps no [R, D] tensor."""
    meta, R, slot_R, x_TD, w_TK = _setup(16, 2, 4, drop=False)
    out_RD = torch.randn(R, D, requires_grad=True)
    saved, y_TD = _saved_shapes(lambda: combine(out_RD, None, meta.dest_row_TK))
    assert saved == [meta.dest_row_TK.shape]
    gy = torch.randn_like(y_TD)
    (y_TD * gy).sum().backward()
    # each row's gradient is its token's
    torch.testing.assert_close(out_RD.grad, gy[slot_R // 2])
