"""RBD on 4 real gloo processes: outputs, every gradient and the traffic counters, exactly.

One spawn runs every case. Each rank builds the same global problem from a shared seed,
runs RBD on its share, and checks it against a one-process ground truth of the whole
problem (per-expert loop with autograd), plus PFT on the same inputs when PFT is built.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xmoe.config import ConfigError, load_config
from xmoe.moe.dispatch import Routing
from xmoe.moe.layer import MoELayer
from xmoe.moe.pft import PFTDispatcher
from xmoe.moe.rbd import RBDDispatcher
from xmoe.parallel.groups import create_parallel_state

W = 4
D = 8

# (node_size, local experts, top_k, tokens per rank, dropping, routing skew)
CASES = [
    (2, 2, 3, [9, 6, 0, 11], False, "random"),
    (2, 3, 4, [12, 7, 5, 8], True, "random"),
    (1, 2, 3, [6, 9, 4, 0], False, "random"),
    (1, 1, 2, [5, 8, 3, 7], True, "random"),
    (2, 2, 2, [7, 5, 6, 9], False, "node0"),  # node 1 receives nothing
    (2, 1, 2, [0, 0, 0, 0], False, "random"),  # no tokens at all
    (4, 2, 3, [8, 6, 7, 5], True, "random"),  # one node: PFT
]


def _problem(case_id: int, El: int, K: int, tokens: list[int], drop: bool, skew: str, L: int):
    E = W * El
    g = torch.Generator().manual_seed(1000 + case_id)
    xs, ids, ws, keeps, gouts = [], [], [], [], []
    for T in tokens:
        xs.append(torch.randn(T, D, generator=g))
        pool = E if skew == "random" else L * El  # "node0": experts of node 0 only
        rows = [torch.randperm(pool, generator=g)[:K] for _ in range(T)]
        ids.append(torch.stack(rows) if rows else torch.zeros(0, K, dtype=torch.int64))
        ws.append(torch.rand(T, K, generator=g))
        keeps.append(torch.rand(T, K, generator=g) > 0.3 if drop else None)
        gouts.append(torch.randn(T, D, generator=g))
    w_EDD = torch.randn(E, D, D, generator=g) / D**0.5
    return xs, ids, ws, keeps, gouts, w_EDD


def _ground_truth(xs, ids, ws, keeps, gouts, w_EDD):
    xs = [x.clone().requires_grad_() for x in xs]
    ws = [w.clone().requires_grad_() for w in ws]
    w_EDD = w_EDD.clone().requires_grad_()
    outs, loss = [], 0.0
    for x, i, w, keep, go in zip(xs, ids, ws, keeps, gouts):
        y_TKD = torch.einsum("td,tkde->tke", x, w_EDD[i])
        wk = w if keep is None else w * keep
        out = (y_TKD * wk[..., None]).sum(1)
        outs.append(out)
        loss = loss + (out * go).sum()
    loss.backward()
    return outs, [x.grad for x in xs], [w.grad for w in ws], w_EDD.grad


def _run_case(case_id: int, case, states: dict) -> None:
    L, El, K, tokens, drop, skew = case
    rank = dist.get_rank()
    E = W * El
    xs, ids, ws, keeps, gouts, w_EDD = _problem(case_id, El, K, tokens, drop, skew, L)
    want = _ground_truth(xs, ids, ws, keeps, gouts, w_EDD)
    cfg = load_config("tiny", [f"moe.num_experts={E}", f"moe.top_k={K}"])

    def run(disp):
        x = xs[rank].clone().requires_grad_()
        w = ws[rank].clone().requires_grad_()
        w_local = w_EDD[rank * El : (rank + 1) * El].clone().requires_grad_()
        d = disp.dispatch(x, Routing(ids[rank], w, keeps[rank], E))
        y = (
            torch.cat([chunk @ w_local[le] for le, chunk in enumerate(d.x_RD.split(d.counts_El))])
            if d.x_RD.shape[0]
            else d.x_RD @ w_local[0]
        )
        if d.weights_R is not None:  # PFT folds the combine weights into the experts
            y = y * d.weights_R[:, None]
        out = disp.combine(y, d)
        (out * gouts[rank]).sum().backward()
        return d, out, x.grad, w.grad, w_local.grad

    rbd = RBDDispatcher(cfg, states[L])
    assert (rbd.fallback is None) == (L < W)
    d, out, gx, gw, gexp = run(rbd)
    tag = f"case {case_id} rank {rank}"
    torch.testing.assert_close(out, want[0][rank], msg=tag)
    torch.testing.assert_close(gx, want[1][rank], msg=tag)
    torch.testing.assert_close(gw, want[2][rank], msg=tag)
    torch.testing.assert_close(gexp, want[3][rank * El : (rank + 1) * El], msg=tag)

    # PFT on the same inputs: the same expert rows, outputs and gradients
    p, pout, pgx, pgw, pgexp = run(PFTDispatcher(cfg, states[L]))
    assert torch.equal(d.x_RD, p.x_RD) and d.counts_El == p.counts_El, tag
    for got, ref in ((out, pout), (gx, pgx), (gw, pgw), (gexp, pgexp)):
        torch.testing.assert_close(got, ref, msg=tag)

    # experts see rows by local expert, then source rank, then token
    rows = []
    for le in range(El):
        for s in range(W):
            hit = ids[s] == rank * El + le
            if keeps[s] is not None:
                hit &= keeps[s]
            rows.append(xs[s][hit.any(1)])
    assert torch.equal(d.x_RD, torch.cat(rows)), tag
    assert d.counts_El == [
        int(sum(r.shape[0] for r in rows[le * W : (le + 1) * W])) for le in range(El)
    ]

    # counters against a brute-force count of the routing table (-1 = dropped)
    kept = _kept(ids[rank], keeps[rank])
    st = d.stats
    if rbd.fallback is not None:
        assert st["inter_node_rows"] == 0 and st["dedup_ratio"] == 1.0, tag
        assert st["intra_node_rows"] == int(((kept >= 0) & (kept // El != rank)).sum()), tag
    else:
        node = rank // L
        pairs = {(t, e // (L * El)) for t, row in enumerate(kept.tolist()) for e in row if e >= 0}
        other = {p for p in pairs if p[1] != node}
        copies = int((kept >= 0).sum())
        assert st["inter_node_rows"] == len(other), tag
        assert st["pilot_rows"] == len(pairs), tag
        assert st["routed_rows"] == copies, tag
        assert st["pft_inter_node_rows"] == int(((kept >= 0) & (kept // (L * El) != node)).sum())
        assert st["dedup_ratio"] == (copies / len(pairs) if pairs else 1.0)
        assert st["inter_node_bytes"] == len(other) * D * 4 + st["pft_inter_node_rows"] * 12
        # intra-node rows: replicas this rank holds for experts on other ranks of its node
        held = 0
        for i in range(W // L):
            s = i * L + rank % L
            k_s = _kept(ids[s], keeps[s])
            owner = k_s // El
            held += int(((k_s >= 0) & (owner // L == node) & (owner != rank)).sum())
        assert st["intra_node_rows"] == held, tag


def _kept(ids_TK: torch.Tensor, keep_TK: torch.Tensor | None) -> torch.Tensor:
    return ids_TK if keep_TK is None else ids_TK.masked_fill(~keep_TK, -1)


def _check_node_limited_layer(state) -> None:
    """The MoE layer gives its router the EP layout: with M = 1 a token stays on one node."""
    over = ["moe.dispatcher=rbd", "moe.max_nodes_per_token=1", "moe.top_k=3"]
    cfg = load_config("tiny", [f"parallel.ep={W}", "parallel.node_size=2", *over])
    torch.manual_seed(0)
    layer = MoELayer(cfg, state)
    assert layer.router.experts_per_node == cfg.moe.num_experts // 2
    x = torch.randn(2, 16, cfg.model.hidden)
    ids_TK = layer.router(x.reshape(-1, cfg.model.hidden)).routing.topk_ids_TK
    assert bool((ids_TK // 4 == ids_TK[:, :1] // 4).all())
    layer(x).sum().backward()  # and RBD runs it
    cfg.moe.top_k = 5  # more experts than one node of 4 holds
    with pytest.raises(ConfigError, match="max_nodes_per_token=1 .* at least 2"):
        MoELayer(cfg, state)


def _worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    states = {}
    for L in (1, 2, 4):
        cfg = load_config("tiny", [f"parallel.ep={W}", f"parallel.node_size={L}"])
        states[L] = create_parallel_state(cfg, rank, W)
    for case_id, case in enumerate(CASES):
        _run_case(case_id, case, states)
        dist.barrier()
    _check_node_limited_layer(states[2])
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_rbd_matches_ground_truth_on_four_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        # a failing rank's traceback comes back in the ProcessRaisedException
        mp.spawn(_worker, args=(os.path.join(tmp, "init"),), nprocs=W, join=True)
