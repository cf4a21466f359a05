import pytest
import torch
import triton_interp
from kernel_cases import CASES, make_routing

from xmoe.kernels.routing import routing_metadata, routing_metadata_torch

test_in_interpreter_process = triton_interp.child_process_test(__file__)


def _expected(ids_TK, keep_TK, E):
    """Brute force: rows ordered by expert, then by flat (t, k) index."""
    flat = ids_TK.reshape(-1).tolist()
    kept = keep_TK.reshape(-1).tolist() if keep_TK is not None else [True] * len(flat)
    slots = sorted((e, n) for n, (e, k) in enumerate(zip(flat, kept)) if k)
    dest = [-1] * len(flat)
    for r, (_, n) in enumerate(slots):
        dest[n] = r
    counts = [sum(1 for e, _ in slots if e == x) for x in range(E)]
    return counts, dest, [n for _, n in slots]


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("name,T,K,E", CASES)
def test_routing_metadata_matches_brute_force(interpreter, name, T, K, E, drop):
    ids_TK, keep_TK = make_routing(T, K, E, seed=T + K + E, drop=drop)
    counts, dest, slots = _expected(ids_TK, keep_TK, E)
    for meta in (routing_metadata(ids_TK, keep_TK, E), routing_metadata_torch(ids_TK, keep_TK, E)):
        assert meta.counts_E.tolist() == counts
        assert meta.dest_row_TK.reshape(-1).tolist() == dest
        assert meta.src_slot_N[: len(slots)].tolist() == slots
        assert meta.src_slot_N.numel() == T * K


def test_counts_per_rank_and_large_block_count(interpreter):
    # Many blocks and more than 2048 rows per expert: the fp16-cumsum failure mode stays exact.
    E, K, T = 4, 2, 3000
    ids_TK, keep_TK = make_routing(T, K, E, seed=3, drop=True)
    meta = routing_metadata(ids_TK, keep_TK, E)
    ref = routing_metadata_torch(ids_TK, keep_TK, E)
    assert torch.equal(meta.counts_E, ref.counts_E)
    assert torch.equal(meta.dest_row_TK, ref.dest_row_TK)
    R = int(ref.counts_E.sum())
    assert torch.equal(meta.src_slot_N[:R], ref.src_slot_N[:R])
    assert meta.counts_per_rank(2).tolist() == [
        int(ref.counts_E[:2].sum()),
        int(ref.counts_E[2:].sum()),
    ]


@pytest.mark.parametrize("first", [0, 3, 5])
def test_routing_metadata_window_of_experts(interpreter, first):
    """`first`: only ids in [first, first + E) are routed (as id - first); the others,
    -1 (dropped upstream) included, are not kept, exactly as if the keep mask said so."""
    T, K, E, G = 37, 3, 4, 12  # E local experts out of G global ones
    g = torch.Generator().manual_seed(first)
    ids_TK = torch.stack([torch.randperm(G, generator=g)[:K] for _ in range(T)])
    ids_TK[::5, 0] = -1
    local = ids_TK - first
    inside = (local >= 0) & (local < E)
    counts, dest, slots = _expected(torch.where(inside, local, 0), inside, E)
    for fn in (routing_metadata, routing_metadata_torch):
        meta = fn(ids_TK, None, E, first)
        assert meta.counts_E.tolist() == counts
        assert meta.dest_row_TK.reshape(-1).tolist() == dest
        assert meta.src_slot_N[: len(slots)].tolist() == slots
    keep = torch.rand(T, K, generator=g) < 0.7  # and a keep mask on top
    counts, dest, _ = _expected(torch.where(inside, local, 0), inside & keep, E)
    meta = routing_metadata(ids_TK, keep, E, first)
    assert meta.counts_E.tolist() == counts and meta.dest_row_TK.reshape(-1).tolist() == dest


@pytest.mark.parametrize("name,T,K,E", CASES)
def test_all_kept_writes_every_slot(interpreter, name, T, K, E):
    """`all_kept` skips the slot buffer's zero fill: with uninitialised memory filled
    with a poison value, every slot still equals the brute-force answer."""
    ids_TK, _ = make_routing(T, K, E, seed=T * K + E, drop=False)
    counts, dest, slots = _expected(ids_TK, None, E)
    fill = torch.utils.deterministic.fill_uninitialized_memory
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert (torch.empty(3, dtype=torch.int64) != 0).all()  # the poison is on
        meta = routing_metadata(ids_TK, None, E, all_kept=True)
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn)
    assert meta.counts_E.tolist() == counts
    assert meta.dest_row_TK.reshape(-1).tolist() == dest
    assert meta.src_slot_N.tolist() == slots
