"""Redundancy-bypassing dispatch (RBD): a token crosses to each node once, not once per expert.

With top-k routing a token often picks several experts on the same node; PFT sends one row
per pick over the network. RBD sends one *pilot* row per (token, destination node) over
the inter-node all-to-all, to the rank with the sender's local index on that node (the
cross-node group: rail to rail, N peers instead of W). That rank, the pilot's *holder*,
copies it into one *replica* per expert the token chose on its node and sends those over
the intra-node all-to-all. The experts then see exactly PFT's rows in PFT's order.

Combine reverses the path. Gate weights travel with the pilots (one scalar per replica),
and the holder forms sum_k w_k * y_k over the node's experts, so one row per (token, node)
returns across nodes; the sender adds the rows of its nodes into the token. Every step
is an autograd op (gathers, index_add, differentiable all-to-all), so gradients reach
`x_TD`, the expert outputs and the gate weights exactly.

One node (or one rank per EP group) has nothing to bypass: the dispatcher is PFT, at no
extra cost. Index arithmetic lives in `xmoe.moe.rbd_plan`; shape legend as there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from xmoe.config import Config, ConfigError
from xmoe.moe.dispatch import Dispatched, Dispatcher, Routing
from xmoe.moe.rbd_plan import (
    NodeLayout,
    Splits,
    expert_order,
    holder_order,
    host_splits,
    pilot_rows,
    plan_sender,
)
from xmoe.parallel.collectives import all_to_all_uneven, exchange_counts


@dataclass
class RBDGroups:
    """The three process groups RBD talks over, and where this rank sits in them."""

    layout: NodeLayout
    ep_group: Any  # counts exchange (W ranks)
    node_group: Any  # intra-node replicas (the L ranks of this node in the EP group)
    cross_group: Any  # inter-node pilots (the N ranks with this rank's local index)


def groups_from_state(parallel_state: Any, num_experts: int) -> RBDGroups:
    """Read the EP group and its node split from a `xmoe.parallel` ParallelState."""
    ps = parallel_state
    W = ps.ep
    ep_ranks = ps.ranks.get("ep", [ps.rank])
    per_node: dict[int, int] = {}
    for r in ep_ranks:
        per_node[r // ps.node_size] = per_node.get(r // ps.node_size, 0) + 1
    if len(set(per_node.values())) > 1:
        raise ConfigError(
            f"moe.dispatcher=rbd needs the same number of EP ranks on every node, but "
            f"parallel.ep={W} over nodes of {ps.node_size} ranks gives {sorted(per_node.values())}: "
            f"choose parallel.ep as a multiple or a divisor of the ranks per node"
        )
    return RBDGroups(
        NodeLayout(W, ps.ep_node_size, num_experts // W, ps.ep_rank),
        ps.ep_group,
        ps.ep_node_group,
        ps.ep_cross_group,
    )


def _one_node_stats(pft: dict[str, float], x_TD: torch.Tensor) -> dict[str, float]:
    """RBD's counters for a one-node EP group, where PFT runs: nothing crosses nodes."""
    routed = pft["sent_rows"]
    return {
        "routed_rows": routed,
        "pilot_rows": routed,
        "dedup_ratio": 1.0,
        "inter_node_rows": 0.0,
        "inter_node_bytes": 0.0,
        "pft_inter_node_rows": 0.0,
        "intra_node_rows": pft["a2a_bytes"] / (x_TD.shape[1] * x_TD.element_size()),
        "intra_node_bytes": pft["a2a_bytes"],
    }


@dataclass
class _State:
    T: int
    token_P: torch.Tensor  # token of every pilot this rank sent, in send order
    pilot_Q: torch.Tensor  # received pilot row of every replica this holder sent
    w_Q: torch.Tensor  # gate weight of every replica this holder sent
    pilots_held: int
    idx_R: torch.Tensor  # intra-node receive row of every expert-grouped row
    splits: Splits


class RBDDispatcher(Dispatcher):
    """Hierarchical dispatch over nodes: pilots across, replicas inside (see module doc)."""

    def __init__(self, cfg: Config, parallel_state: Any = None) -> None:
        super().__init__()
        self.num_experts = cfg.moe.num_experts
        self.groups: RBDGroups | None = None
        if parallel_state is not None and parallel_state.ep > 1:
            self.groups = groups_from_state(parallel_state, self.num_experts)
        self.fallback: Dispatcher | None = None
        if self.groups is None or self.groups.layout.nodes == 1:
            from xmoe.moe.pft import PFTDispatcher

            self.fallback = PFTDispatcher(cfg, parallel_state)

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> Dispatched:
        if self.fallback is not None:
            d = self.fallback.dispatch(x_TD, routing)
            if self.groups is not None:
                d.stats.update(_one_node_stats(d.stats, x_TD))
            return d
        g = self.groups
        lay = g.layout
        K = routing.top_k
        plan = plan_sender(routing.topk_ids_TK, routing.keep_TK, lay)
        recv_msg_WC = exchange_counts(plan.msg_WC.view(-1), g.ep_group)
        sent_WC, recv_WC = torch.stack([plan.msg_WC, recv_msg_WC]).tolist()  # the one host sync
        sp = host_splits(sent_WC, recv_WC, lay)

        # sender: one pilot row per (token, node), gate weights per replica
        token_P, slot_Q = pilot_rows(plan, sp, K)
        Q = slot_Q.shape[0]
        x_PD = x_TD.index_select(0, token_P)
        w_Q = routing.topk_weights_TK.reshape(-1).index_select(0, slot_Q)
        pilots_PD = all_to_all_uneven(x_PD, sp.pilots_sent, sp.pilots_recv, g.cross_group)
        w_recv_Q = all_to_all_uneven(w_Q, sp.replicas_sent, sp.replicas_recv, g.cross_group)
        meta_Q = all_to_all_uneven(
            plan.meta_N[:Q], sp.replicas_sent, sp.replicas_recv, g.cross_group
        )

        # holder: replicas for this node's experts, by (node expert, source node, token)
        order_Q, pilot_Q = holder_order(meta_Q, sp, lay)
        rep_QD = pilots_PD.index_select(0, pilot_Q)
        recv_RD = all_to_all_uneven(rep_QD, sp.intra_sent, sp.intra_recv, g.node_group)

        # expert: rows by local expert, then source rank, then token (PFT's order)
        idx_R = expert_order(sp, lay, x_TD.device)
        x_RD = recv_RD.index_select(0, idx_R)
        state = _State(
            x_TD.shape[0],
            token_P,
            pilot_Q,
            w_recv_Q.index_select(0, order_Q),
            pilots_PD.shape[0],
            idx_R,
            sp,
        )
        return Dispatched(x_RD, sp.counts_El, state, self._stats(sp, x_TD))

    def combine(self, y_RD: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        if self.fallback is not None:
            return self.fallback.combine(y_RD, dispatched)
        g, st = self.groups, dispatched.state
        sp = st.splits
        inv_R = torch.empty_like(st.idx_R)
        inv_R[st.idx_R] = torch.arange(st.idx_R.shape[0], device=inv_R.device)
        y_recv_RD = y_RD.index_select(0, inv_R)
        y_QD = all_to_all_uneven(y_recv_RD, sp.intra_recv, sp.intra_sent, g.node_group)
        w_Q1 = st.w_Q.to(y_QD.dtype).unsqueeze(1)
        # sum over this node's experts on the holder: one row per (token, node) goes back
        node_sum_PD = y_QD.new_zeros(st.pilots_held, y_QD.shape[1]).index_add(
            0, st.pilot_Q, y_QD * w_Q1
        )
        y_PD = all_to_all_uneven(node_sum_PD, sp.pilots_recv, sp.pilots_sent, g.cross_group)
        return y_PD.new_zeros(st.T, y_PD.shape[1]).index_add(0, st.token_P, y_PD)

    def _stats(self, sp: Splits, x_TD: torch.Tensor) -> dict[str, float]:
        """This rank's dispatch-direction traffic; combine sends the same rows back."""
        lay = self.groups.layout
        row_bytes = x_TD.shape[1] * x_TD.element_size()
        # per replica crossing nodes: its int64 metadata and its gate weight
        meta_bytes = 8 + x_TD.element_size()
        routed = sum(sp.replicas_sent)
        pilots = sum(sp.pilots_sent)
        inter = pilots - sp.pilots_sent[lay.node]
        inter_copies = routed - sp.replicas_sent[lay.node]
        intra = sum(sp.intra_sent) - sp.intra_sent[lay.local]
        return {
            "rows": float(sum(sp.counts_El)),
            "routed_rows": float(routed),
            "pilot_rows": float(pilots),
            "dedup_ratio": routed / pilots if pilots else 1.0,
            "inter_node_rows": float(inter),
            "inter_node_bytes": float(inter * row_bytes + inter_copies * meta_bytes),
            # what PFT would have sent across nodes for the same routing
            "pft_inter_node_rows": float(inter_copies),
            "intra_node_rows": float(intra),
            "intra_node_bytes": float(intra * row_bytes),
        }
