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
is differentiable (the permute/combine kernels' gathers and the uneven all-to-all), so
gradients reach `x_TD`, the expert outputs and the gate weights exactly; the holder's
combine kernel gives the gate-weight gradient as PFT's does.

One node (or one rank per EP group) has nothing to bypass: the dispatcher is PFT, at no
extra cost. Index arithmetic lives in `xmoe.moe.rbd_plan`; shape legend as there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from xmoe.config import Config, ConfigError
from xmoe.kernels.combine import combine
from xmoe.kernels.permute import permute, scatter_rows, unpermute
from xmoe.moe.dispatch import Dispatched, Dispatcher, Routing
from xmoe.moe.rbd_plan import (
    HolderPlan,
    NodeLayout,
    PilotPlan,
    Splits,
    expert_order,
    holder_plan,
    host_splits,
    pilot_plan,
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


class _SumOverNodes(torch.autograd.Function):
    """out_TD[t] = sum of the rows returned for token t from each node (the adjoint of
    sending its pilots): a gather per token forward, a copy to each pilot backward."""

    @staticmethod
    def forward(ctx, y_PD, dest_row_TN):
        ctx.save_for_backward(dest_row_TN)
        ctx.pilots = y_PD.shape[0]
        return unpermute(y_PD.contiguous(), dest_row_TN)

    @staticmethod
    def backward(ctx, grad_TD):
        (dest_row_TN,) = ctx.saved_tensors
        return scatter_rows(grad_TD.contiguous(), dest_row_TN, ctx.pilots), None


@dataclass
class _State:
    pilots: PilotPlan
    holder: HolderPlan
    w_PK: torch.Tensor  # gate weights of the held pilots' replicas, as a (pilot, slot) table
    idx_R: torch.Tensor  # intra-node receive row of every expert-grouped row
    inv_R: torch.Tensor
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

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, meanwhile=None) -> Dispatched:
        if self.fallback is not None:
            d = self.fallback.dispatch(x_TD, routing, meanwhile)
            if self.groups is not None:
                d.stats.update(_one_node_stats(d.stats, x_TD))
            return d
        g = self.groups
        lay = g.layout
        K = routing.top_k
        plan = plan_sender(routing.topk_ids_TK, routing.keep_TK, lay)
        recv_msg_WC = exchange_counts(plan.msg_WC.view(-1), g.ep_group)
        if meanwhile is not None:
            meanwhile()
        sent_WC, recv_WC = torch.stack([plan.msg_WC, recv_msg_WC]).tolist()  # the one host sync
        sp = host_splits(sent_WC, recv_WC, lay)

        # sender: one pilot row per (token, node), gate weights per replica
        T = x_TD.shape[0]
        pp = pilot_plan(plan, sp, T, K, lay.nodes)
        Q = pp.slot_Q.shape[0]
        x_PD = permute(x_TD, pp.dest_row_TN, pp.src_slot_P.numel())
        w_Q = routing.topk_weights_TK.reshape(-1).index_select(0, pp.slot_Q)
        pilots_PD = all_to_all_uneven(x_PD, sp.pilots_sent, sp.pilots_recv, g.cross_group)
        w_recv_Q = all_to_all_uneven(w_Q, sp.replicas_sent, sp.replicas_recv, g.cross_group)
        meta_Q = all_to_all_uneven(
            plan.meta_N[:Q], sp.replicas_sent, sp.replicas_recv, g.cross_group
        )

        # holder: replicas for this node's experts, by (node expert, source node, token)
        hp = holder_plan(meta_Q, recv_msg_WC, sp, lay, K)
        P_held, Kh = hp.dest_row_PK.shape
        w_PK = w_recv_Q.new_zeros(P_held * Kh).scatter(0, hp.w_slot_Q, w_recv_Q).view(P_held, Kh)
        rep_SD = permute(pilots_PD, hp.dest_row_PK, hp.src_slot_S.numel())
        recv_RD = all_to_all_uneven(rep_SD, sp.intra_sent, sp.intra_recv, g.node_group)

        # expert: rows by local expert, then source rank, then token (PFT's order)
        idx_R = expert_order(recv_msg_WC, lay, sum(sp.counts_El))
        inv_R = torch.empty_like(idx_R)
        inv_R[idx_R] = torch.arange(idx_R.shape[0], device=idx_R.device)
        x_RD = permute(recv_RD, inv_R.view(-1, 1), idx_R.numel())  # row i: recv row idx_R[i]
        state = _State(pp, hp, w_PK, idx_R, inv_R, sp)
        w_bytes = routing.topk_weights_TK.element_size()
        return Dispatched(x_RD, sp.counts_El, state, self._stats(sp, x_TD, w_bytes))

    def combine(self, y_RD: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        if self.fallback is not None:
            return self.fallback.combine(y_RD, dispatched)
        g, st = self.groups, dispatched.state
        sp = st.splits
        y_recv_RD = permute(y_RD, st.idx_R.view(-1, 1), st.idx_R.numel())
        y_SD = all_to_all_uneven(y_recv_RD, sp.intra_recv, sp.intra_sent, g.node_group)
        # the holder sums the node's weighted expert outputs: one row per (token, node) returns
        node_sum_PD = combine(y_SD, st.w_PK, st.holder.dest_row_PK)
        y_PD = all_to_all_uneven(node_sum_PD, sp.pilots_recv, sp.pilots_sent, g.cross_group)
        return _SumOverNodes.apply(y_PD, st.pilots.dest_row_TN)

    def _stats(self, sp: Splits, x_TD: torch.Tensor, w_bytes: int) -> dict[str, float]:
        """This rank's dispatch-direction traffic; combine sends the same rows back."""
        lay = self.groups.layout
        row_bytes = x_TD.shape[1] * x_TD.element_size()
        # per replica crossing nodes: its int64 slot/expert word and its gate weight
        meta_bytes = 8 + w_bytes
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
