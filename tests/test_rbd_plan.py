"""RBD's index arithmetic, checked in one process by playing every rank's exchange by hand."""

from __future__ import annotations

import pytest
import torch

from xmoe.moe.rbd_plan import (
    NodeLayout,
    expert_order,
    holder_plan,
    host_splits,
    node_limited_topk,
    pilot_plan,
    plan_sender,
)


def _routing(T: int, K: int, E: int, seed: int, drop: bool):
    g = torch.Generator().manual_seed(seed)
    ids_TK = (
        torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        if T
        else (torch.zeros(0, K, dtype=torch.int64))
    )
    w_TK = torch.rand(T, K, generator=g)
    keep_TK = torch.rand(T, K, generator=g) > 0.3 if drop else None
    return ids_TK, w_TK, keep_TK


def _simulate(W: int, L: int, El: int, K: int, tokens: list[int], drop: bool, D: int = 3):
    """Run dispatch and combine for all W ranks with lists standing in for the collectives."""
    E, N = W * El, W // L
    lays = [NodeLayout(W, L, El, s) for s in range(W)]
    xs = [torch.randn(T, D) for T in tokens]
    rts = [_routing(T, K, E, 100 + s, drop) for s, T in enumerate(tokens)]
    plans = [plan_sender(ids, keep, lay) for (ids, _, keep), lay in zip(rts, lays)]
    recv_msgs = [[plans[s].msg_WC[r].tolist() for s in range(W)] for r in range(W)]
    recv_dev = [torch.stack([plans[s].msg_WC[r] for s in range(W)]) for r in range(W)]
    splits = [host_splits(p.msg_WC.tolist(), recv_msgs[s], lays[s]) for s, p in enumerate(plans)]

    # sender: pilots, metadata and weights, chunked by destination node
    sent = []
    for s in range(W):
        pp = pilot_plan(plans[s], splits[s], tokens[s], K, N)
        slot_Q, P = pp.slot_Q, pp.src_slot_P.numel()
        Q = slot_Q.numel()
        token_P = pp.src_slot_P // N
        assert torch.equal(pp.dest_row_TN.reshape(-1)[pp.src_slot_P], torch.arange(P))
        assert int((pp.dest_row_TN >= 0).sum()) == P
        # pilots leave grouped by destination node, as the splits say
        assert (pp.src_slot_P % N).tolist() == sum(
            ([j] * n for j, n in enumerate(splits[s].pilots_sent)), []
        )
        sent.append(
            (
                pp,
                xs[s][token_P].split(splits[s].pilots_sent),
                plans[s].meta_N[:Q].split(splits[s].replicas_sent),
                rts[s][1].reshape(-1)[slot_Q].split(splits[s].replicas_sent),
                slot_Q,
            )
        )
    # holder (j, l) receives from (i, l) for every node i
    holders = {}
    for h in range(W):
        j, lo = divmod(h, L)
        srcs = [i * L + lo for i in range(N)]
        pil = torch.cat([sent[s][1][j] for s in srcs])
        meta = torch.cat([sent[s][2][j] for s in srcs])
        w = torch.cat([sent[s][3][j] for s in srcs])
        assert pil.shape[0] == sum(splits[h].pilots_recv)
        assert meta.shape[0] == sum(splits[h].replicas_recv)
        hp = holder_plan(meta, recv_dev[h], splits[h], lays[h], K)
        P_h, Kh = hp.dest_row_PK.shape
        S = hp.src_slot_S.numel()
        assert torch.equal(hp.dest_row_PK.reshape(-1)[hp.src_slot_S], torch.arange(S))
        assert torch.equal(torch.sort(hp.w_slot_Q).values, torch.sort(hp.src_slot_S).values)
        w_PK = torch.zeros(P_h * Kh).scatter(0, hp.w_slot_Q, w).view(P_h, Kh)
        rep = pil[hp.src_slot_S // Kh]
        holders[h] = (pil, w_PK, hp, rep.split(splits[h].intra_sent))
    # expert rank (j, lp) receives from holders (j, lr)
    outs = {}
    for r in range(W):
        j, lp = divmod(r, L)
        recv = torch.cat([holders[j * L + lr][3][lp] for lr in range(L)])
        assert [holders[j * L + lr][3][lp].shape[0] for lr in range(L)] == splits[r].intra_recv
        idx_R = expert_order(recv_dev[r], lays[r], sum(splits[r].counts_El))
        x_RD = recv[idx_R]
        # brute force: local expert, then source rank, then token
        want = []
        for le in range(El):
            for s in range(W):
                ids, _, keep = rts[s]
                hit = ids == r * El + le
                if keep is not None:
                    hit &= keep
                want.append(xs[s][hit.any(1)])
        want = torch.cat(want) if want else torch.zeros(0, D)
        assert torch.equal(x_RD, want), f"rank {r} sees rows in the wrong order"
        assert splits[r].counts_El == [
            sum(
                int(((rts[s][0] == r * El + le) & (rts[s][2] if drop else True)).sum())
                for s in range(W)
            )
            for le in range(El)
        ]
        le_R = torch.repeat_interleave(torch.arange(El), torch.tensor(splits[r].counts_El))
        y_RD = x_RD * (r * El + le_R + 1.0)[:, None]  # expert e multiplies by e + 1
        y_recv = torch.empty_like(y_RD)
        y_recv[idx_R] = y_RD
        outs[r] = y_recv.split(splits[r].intra_recv)
    # combine: back to holders, weighted into pilots, back to senders
    back = {}
    for h in range(W):
        j, lo = divmod(h, L)
        pil, w_PK, hp, _ = holders[h]
        y_S = torch.cat([outs[j * L + lp][lo] for lp in range(L)])
        dest_PK = hp.dest_row_PK
        w_valid_PK = torch.where(dest_PK >= 0, w_PK, 0.0)
        acc = (
            (y_S[dest_PK.clamp_min(0)] * w_valid_PK[..., None]).sum(1)
            if y_S.numel()
            else torch.zeros_like(pil)
        )
        back[h] = acc.split(splits[h].pilots_recv)
    for s in range(W):
        i, lo = divmod(s, L)
        dest_TN = sent[s][0].dest_row_TN
        y_P = torch.cat([back[j * L + lo][i] for j in range(N)])
        out = (
            (y_P[dest_TN.clamp_min(0)] * (dest_TN >= 0)[..., None]).sum(1)
            if y_P.numel()
            else torch.zeros_like(xs[s])
        )
        ids, w, keep = rts[s]
        w_eff = w if keep is None else w * keep
        want = (xs[s][:, None, :] * (ids + 1.0)[..., None] * w_eff[..., None]).sum(1)
        torch.testing.assert_close(out, want)
        # inter-node rows = unique (token, other node) pairs
        nodes_TK = ids // (L * El)
        pairs = {
            (t, int(nodes_TK[t, k]))
            for t in range(ids.shape[0])
            for k in range(K)
            if (keep is None or keep[t, k]) and int(nodes_TK[t, k]) != i
        }
        sent_other = sum(n for j, n in enumerate(splits[s].pilots_sent) if j != i)
        assert sent_other == len(pairs)


@pytest.mark.parametrize(
    "W,L,El,K",
    [(4, 2, 2, 3), (4, 1, 3, 4), (4, 4, 2, 3), (8, 2, 1, 4), (8, 4, 3, 5), (6, 3, 2, 6)],
)
@pytest.mark.parametrize("drop", [False, True])
def test_plan_routes_like_brute_force(W, L, El, K, drop):
    _simulate(W, L, El, K, [7, 0, 5, 11, 3, 1, 9, 2][:W], drop)


def test_plan_with_no_tokens_anywhere():
    _simulate(4, 2, 2, 2, [0, 0, 0, 0], drop=False)


def test_node_limited_topk_keeps_tokens_on_few_nodes():
    g = torch.Generator().manual_seed(0)
    scores_TE = torch.rand(50, 16, generator=g)
    ids_TK = node_limited_topk(scores_TE, top_k=4, max_nodes=2, experts_per_node=4)
    assert ids_TK.shape == (50, 4)
    for t in range(50):
        assert len(set((ids_TK[t] // 4).tolist())) <= 2
        assert len(set(ids_TK[t].tolist())) == 4
        # the chosen experts are the best ones on the chosen nodes
        nodes = set((ids_TK[t] // 4).tolist())
        allowed = [e for e in range(16) if e // 4 in nodes]
        best = sorted(allowed, key=lambda e: -scores_TE[t, e].item())[:4]
        assert set(ids_TK[t].tolist()) == set(best)
    # off or no-op limits give plain top-k
    plain = torch.topk(scores_TE, 4, dim=-1).indices
    assert torch.equal(node_limited_topk(scores_TE, 4, 0, 4), plain)
    assert torch.equal(node_limited_topk(scores_TE, 4, 4, 4), plain)
    with pytest.raises(ValueError, match="max_nodes_per_token"):
        node_limited_topk(scores_TE, 4, 1, 2)


def test_router_limits_tokens_to_max_nodes():
    from xmoe.config import load_config
    from xmoe.moe.router import Router

    cfg = load_config("tiny", ["moe.num_experts=16", "moe.top_k=4", "moe.max_nodes_per_token=2"])
    torch.manual_seed(0)
    router = Router(cfg.moe, hidden=32)
    x_TD = torch.randn(40, 32)
    plain = router(x_TD).routing.topk_ids_TK  # experts_per_node unset: plain top-k
    assert torch.equal(plain, torch.topk(x_TD @ router.weight_ED.T, 4, dim=-1).indices)
    router.experts_per_node = 4  # 4 nodes of 4 experts
    r = router(x_TD).routing
    probs_TE = torch.softmax(x_TD @ router.weight_ED.T, dim=-1)
    assert torch.equal(r.topk_ids_TK, node_limited_topk(probs_TE, 4, 2, 4))
    assert all(len(set((row // 4).tolist())) <= 2 for row in r.topk_ids_TK)
    w_TK = probs_TE.gather(1, r.topk_ids_TK)
    torch.testing.assert_close(r.topk_weights_TK, w_TK / w_TK.sum(-1, keepdim=True))
    assert not torch.equal(r.topk_ids_TK, plain)  # the limit bites on this input


def test_rbd_refuses_nodes_with_unequal_ep_ranks():
    from xmoe.config import ConfigError
    from xmoe.moe.rbd import groups_from_state
    from xmoe.parallel.groups import ParallelState, build_groups

    lists = build_groups(world=12, tp=1, ep=4, node_size=3)  # EP ranks 0-3: 3 + 1 per node
    ranks = {kind: next(g for g in groups if 0 in g) for kind, groups in lists.items()}
    state = ParallelState(rank=0, world=12, node_size=3, ep=4, ranks=ranks)
    with pytest.raises(ConfigError, match="parallel.ep=4"):
        groups_from_state(state, num_experts=8)
    ok = ParallelState(
        rank=3, world=4, node_size=2, ep=4, ranks={"ep": [0, 1, 2, 3], "node_local": [2, 3]}
    )
    lay = groups_from_state(ok, num_experts=8).layout
    assert (lay.nodes, lay.node, lay.local, lay.local_experts) == (2, 1, 1, 2)
