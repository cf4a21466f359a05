"""PFT (EP = 2, 4) and padded (EP = 2) on real gloo ranks equal one rank holding every expert.

Each rank builds the same global problem from a shared seed. The ground truth runs the
reference layer (EP = 1, all experts) on every rank's tokens separately, since capacity
is a per-rank decision over local tokens; the loss sums over ranks. Then outputs and input
gradients must match per rank, local expert gradients must match their slice, and router
and shared-expert gradients summed over ranks must match.
"""

import pytest
import torch
import torch.distributed as dist
from ep_spawn import run_ranks

from xmoe.config import load_config
from xmoe.moe.layer import MoELayer
from xmoe.parallel.groups import create_parallel_state

D = 16
BASE = [f"model.hidden={D}", "moe.expert_hidden=8", "moe.num_experts=8"]
# (overrides, tokens per rank for W=2 / W=4, routing)
CASES = [
    ([], [13, 9, 11, 6], "random"),
    (["moe.capacity_factor=0.7", "moe.top_k=3"], [12, 10, 14, 9], "random"),
    (["moe.num_shared_experts=0", "moe.activation=gelu"], [7, 0, 5, 8], "random"),
    (["moe.top_k=1"], [10, 6, 9, 4], "last_rank_idle"),  # last rank's experts get no rows
]


def _layers(dispatcher, overrides, W, state, extra=()):
    torch.manual_seed(5)
    ref = MoELayer(load_config("tiny", [*BASE, *overrides])).double()
    ep = MoELayer(
        load_config(
            "tiny",
            [*BASE, *overrides, f"moe.dispatcher={dispatcher}", f"parallel.ep={W}", *extra],
        ),
        state,
    ).double()
    El = 8 // W
    lo = state.ep_rank * El
    with torch.no_grad():
        for name, p in ep.named_parameters():
            full = dict(ref.named_parameters())[name]
            p.copy_(full[lo : lo + El] if name.startswith("experts.") else full)
    return ref, ep, lo, El


def _check(rank, W, dispatcher, extra=(), warm=None, poison=False):
    """`warm`: first run the EP layer once on as many tokens plus `warm` (no gradients),
    so that a `moe.dedup_fixed_slots` dispatcher has agreed its slots. `poison`:
    uninitialised floats are NaN (torch's deterministic mode), so rows or weights that
    nothing wrote (empty slots) turn the result NaN if they are ever read."""
    if poison:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = True
    state = create_parallel_state(load_config("tiny", [*BASE, f"parallel.ep={W}"]), rank, W)
    for case_id, (overrides, tokens, routing) in enumerate(CASES):
        tokens = tokens[:W]
        ref, ep, lo, El = _layers(dispatcher, overrides, W, state, extra)
        g = torch.Generator().manual_seed(100 + case_id)
        xs = [torch.randn(T, D, generator=g, dtype=torch.float64) for T in tokens]
        gys = [torch.randn(T, D, generator=g, dtype=torch.float64) for T in tokens]
        if routing == "last_rank_idle":
            xs = [x.abs() for x in xs]
            with torch.no_grad():
                for layer in (ref, ep):
                    layer.router.weight_ED[8 - El :] = -1.0
        # ground truth: every rank's tokens through the one-rank reference
        xr = [x.clone().requires_grad_() for x in xs]
        ys = [ref(x) for x in xr]
        sum((y * gy).sum() for y, gy in zip(ys, gys)).backward()

        if warm is not None:
            with torch.no_grad():
                ep(torch.randn(max(0, tokens[rank] + warm), D, dtype=torch.float64))
        x = xs[rank].clone().requires_grad_()
        y = ep(x)
        (y * gys[rank]).sum().backward()
        tag = f"{dispatcher} {' '.join(extra)} warm {warm} case {case_id} rank {rank}/{W}"
        if warm is not None:
            slots = max(max(0, t + warm) for t in tokens)  # as the warm-up agreed them
            fixed = ep.last_stats["dispatcher"]["sent_rows"] == W * slots
            # the slots held every rank's tokens, or every rank redid the dispatch
            assert fixed is (max(tokens) <= slots), tag
            if fixed:
                assert ep.last_stats["dispatcher"]["a2a_bytes"] == (W - 1) * slots * D * 8
        torch.testing.assert_close(y, ys[rank], msg=tag)
        torch.testing.assert_close(x.grad, xr[rank].grad, msg=tag)
        ref_params = dict(ref.named_parameters())
        for name, p in ep.named_parameters():
            want = ref_params[name].grad
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            if name.startswith("experts."):
                want = want[lo : lo + El]
            else:
                dist.all_reduce(grad)
            torch.testing.assert_close(grad, want, msg=f"{tag} {name}")
        if routing == "last_rank_idle" and rank == W - 1 and dispatcher == "pft":
            assert ep.last_stats["dispatcher"]["rows"] == 0


@pytest.mark.parametrize("dispatcher,world", [("pft", 2), ("pft", 4), ("padded", 2)])
def test_ep_equals_single_rank(dispatcher, world):
    # pft: the plain exchange (one row per (token, k)); moe.dedup_ep, its default with
    # EP, has its own tests below
    run_ranks(world, _check, dispatcher, ["moe.dedup_ep=false"] if dispatcher == "pft" else [])


@pytest.mark.parametrize("world", [2, 4])
def test_ep_overlap_equals_single_rank(world):
    """moe.overlap_ep: the own rows' experts run while the others' rows are exchanged (the
    exchanges leave the own rows out); same outputs and gradients as one rank, including
    a rank whose experts get no rows and a rank with no tokens."""
    run_ranks(world, _check, "pft", ["moe.overlap_ep=true"])
    run_ranks(world, _check, "pft", ["moe.overlap_ep=true", "moe.fold_combine_weights=false"])


@pytest.mark.parametrize("world", [2, 4])
def test_ep_dedup_equals_single_rank(world):
    """moe.dedup_ep: one pilot row per (token, destination rank) crosses and the receiver
    copies it to each of its experts; same outputs and gradients as one rank, dropping and
    dropless, with folded and with unfolded combine weights."""
    run_ranks(world, _check, "pft", ["moe.dedup_ep=true"])
    run_ranks(world, _check, "pft", ["moe.dedup_ep=true", "moe.fold_combine_weights=false"])


@pytest.mark.parametrize("world", [2, 4])
def test_ep_dedup_fixed_slots_equals_single_rank(world):
    """moe.dedup_fixed_slots: every rank pair exchanges as many pilot slots as the most
    tokens on a rank (agreed at the first call), the exchanges queued before the host
    sync; same outputs and gradients as one rank, dropping and dropless, with folded and
    unfolded weights, a rank with no tokens among them, and with the empty slots' memory
    NaN. A call with more tokens than the slots (warm-up on fewer) redoes its dispatch
    with the exact counts on every rank."""
    fixed = ["moe.dedup_ep=true", "moe.dedup_fixed_slots=true"]
    run_ranks(world, _check, "pft", fixed, 0, True)
    run_ranks(world, _check, "pft", [*fixed, "moe.fold_combine_weights=false"], 0)
    run_ranks(world, _check, "pft", fixed, -3)


@pytest.mark.parametrize("world", [2, 4])
def test_ep_dedup_overlap_equals_single_rank(world):
    """moe.dedup_ep with moe.overlap_ep: the own pilots stay out of the exchanges and their
    experts run beside them; same outputs and gradients as one rank."""
    both = ["moe.dedup_ep=true", "moe.overlap_ep=true"]
    run_ranks(world, _check, "pft", both)
    run_ranks(world, _check, "pft", [*both, "moe.fold_combine_weights=false"])


def _dedup_rows(rank, W):
    """Exact pilot counts: each token crosses to each rank of its experts once."""
    state = create_parallel_state(load_config("tiny", [*BASE, f"parallel.ep={W}"]), rank, W)
    over = [*BASE, "moe.dispatcher=pft", f"parallel.ep={W}", "moe.top_k=4"]
    layer = MoELayer(load_config("tiny", [*over, "moe.dedup_ep=true"]), state).double()
    x = torch.randn(20, D, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    layer(x)
    ids = layer.router(x).routing.topk_ids_TK
    El = 8 // W
    pilots = sum(len(set((ids[t] // El).tolist())) for t in range(ids.shape[0]))
    stays = sum(int(((ids[t] // El) == rank).any()) for t in range(ids.shape[0]))
    st = layer.last_stats["dispatcher"]
    assert st["sent_rows"] == pilots
    assert st["a2a_bytes"] == (pilots - stays) * D * 8
    assert pilots < ids.numel()  # top-4 of 8 over W ranks: some tokens share a rank
    rows = torch.tensor([st["rows"]], dtype=torch.float64)
    dist.all_reduce(rows)
    assert rows.item() == ids.numel() * W  # every (token, k) row reaches its expert


@pytest.mark.parametrize("world", [2, 4])
def test_ep_dedup_row_counts(world):
    run_ranks(world, _dedup_rows)


def _overlap_order(rank, W):
    from xmoe.moe import pft

    state = create_parallel_state(load_config("tiny", [*BASE, f"parallel.ep={W}"]), rank, W)
    over = [*BASE, "moe.dispatcher=pft", f"parallel.ep={W}", "moe.overlap_ep=true"]
    layer = MoELayer(load_config("tiny", over), state).double()
    log, ex = [], layer.experts
    start, wait, vjp = pft._Exchange.start, pft._Exchange.wait, pft._vjp
    pft._Exchange.start = lambda self, x, **kw: (
        log.append(("start", x.shape[0])),
        start(self, x, **kw),
    )[1]
    pft._Exchange.wait = lambda self: (log.append(("wait",)), wait(self))[1]
    pft._vjp = lambda e, inputs, g: (log.append(("vjp", g.shape[0])), vjp(e, inputs, g))[1]
    whole, hidden, project = ex.forward, ex.hidden, ex.project
    inside = []  # the halves called by a whole experts call are not logged

    def experts(x, *a):
        log.append(("experts", x.shape[0]))
        inside.append(1)
        try:
            return whole(x, *a)
        finally:
            inside.pop()

    def half(name, fn):
        return lambda x, *a: (inside or log.append((name, x.shape[0])), fn(x, *a))[1]

    ex.forward, ex.hidden, ex.project = experts, half("hidden", hidden), half("project", project)
    x = torch.randn(12, D, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    x.requires_grad_()
    y = layer(x)
    st_rows = layer.last_stats["dispatcher"]
    own = int(st_rows["sent_rows"] - st_rows["a2a_bytes"] / (D * 8))
    other, recv = int(st_rows["sent_rows"]) - own, int(st_rows["rows"]) - own
    # forward: each exchange of the other ranks' rows (and their combine weights, which
    # travel with them) is started, then expert work on the own rows runs, then it is
    # waited for; the own rows never enter an exchange
    assert log == [
        ("start", other), ("start", other), ("hidden", own), ("wait",), ("experts", recv),
        ("start", recv), ("project", own), ("wait",),
    ], (log, st_rows)  # fmt: skip
    # what the node keeps for backward holds the own rows' bytes, not the send buffer's
    node, todo = None, [y.grad_fn]
    while todo and node is None:
        fn = todo.pop()
        if type(fn).__name__ == "_OverlappedExpertsBackward":
            node = fn
        todo += [f for f, _ in fn.next_functions if f is not None]
    x_own = node.own[0]
    assert x_own.shape[0] == own
    assert x_own.untyped_storage().nbytes() == x_own.numel() * x_own.element_size()
    log.clear()
    y.sum().backward()
    # backward: the same, in reverse, with the own halves' backward inside each exchange
    assert log == [
        ("start", other), ("vjp", own), ("wait",), ("vjp", recv),
        ("start", recv), ("start", recv), ("vjp", own), ("wait",),
    ], log  # fmt: skip
    pft._Exchange.start, pft._Exchange.wait, pft._vjp = start, wait, vjp


def test_ep_overlap_order():
    run_ranks(2, _overlap_order)
