"""Index arithmetic for redundancy-bypassing dispatch (RBD), kept apart from the collectives.

RBD moves a token across nodes once per destination node, as a *pilot* row, however many
of that node's experts it chose; the rank that receives the pilot (its *holder*) copies it
into one *replica* per chosen expert and sends those inside the node. Everything here is
plain tensor arithmetic on one rank, testable without a process group.

Layout: the W ranks of the expert-parallel group form N = W / L nodes of L consecutive
ranks; rank s sits on node s // L at local index s % L and owns El consecutive experts, so
a node owns En = L * El experts ("node expert" ne = e % En). A pilot for node j goes to
the rank with the sender's own local index on node j (the cross-node group), so the
inter-node step runs rail to rail and never needs the whole EP group.

Orders (chosen so each step needs one sort at most and the experts see PFT's order):
  sender:  replicas by (node j, token t, node expert ne); pilots by (j, t)
  holder:  received by (source node i, t, ne); sent inside the node by (ne, i, t)
  expert:  received by (holder lr, local expert le, i, t); handed on by (le, i, lr, t),
           i.e. by local expert, then source rank s = i * L + lr, then token.

Shape legend as in `xmoe.moe.dispatch`, plus Q replica rows (kept assignments, i.e. routed
copies), P pilot rows, N nodes, L ranks per node, En experts per node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xmoe.kernels.routing import count_ids


@dataclass(frozen=True)
class NodeLayout:
    """Where one rank of the expert-parallel group sits among nodes, and its experts."""

    world: int  # W ranks in the expert-parallel group
    node_size: int  # L ranks per node
    local_experts: int  # El experts per rank
    rank: int  # this rank's index in the expert-parallel group

    def __post_init__(self) -> None:
        if self.node_size < 1 or self.world % self.node_size:
            raise ValueError(
                f"node size {self.node_size} must divide the expert-parallel size {self.world}"
            )

    @property
    def nodes(self) -> int:
        return self.world // self.node_size

    @property
    def node(self) -> int:
        return self.rank // self.node_size

    @property
    def local(self) -> int:
        return self.rank % self.node_size

    @property
    def experts_per_node(self) -> int:
        return self.node_size * self.local_experts

    @property
    def msg_width(self) -> int:
        """Ints per peer in the one counts exchange: El expert counts, pilots, L replica counts."""
        return self.local_experts + 1 + self.node_size


@dataclass
class SenderPlan:
    """Device-side plan of one rank's outgoing pilots, before the counts are on the host.

    The entries past the kept assignments (dropped ones sort last) are garbage until sliced
    with the host counts; nothing here waits for the host.
    """

    order_N: torch.Tensor  # flat assignment t*K+k, in replica order (kept first)
    meta_N: torch.Tensor  # per replica: (pilot index in its node chunk * Kh + slot) * En + ne
    pilot_pos_N: torch.Tensor  # positions in replica order that start a pilot, pilots first
    pair_N: torch.Tensor  # node * T + token of every position in replica order
    msg_WC: torch.Tensor  # int64 [W, El+1+L], the counts sent to every EP rank


def plan_sender(
    topk_ids_TK: torch.Tensor, keep_TK: torch.Tensor | None, layout: NodeLayout
) -> SenderPlan:
    """Sort this rank's kept assignments into pilots and replicas per destination node."""
    T, K = topk_ids_TK.shape
    N, L, El, En = layout.nodes, layout.node_size, layout.local_experts, layout.experts_per_node
    E = layout.world * El
    dev = topk_ids_TK.device
    ids_N = topk_ids_TK.reshape(-1).long()
    t_N = torch.arange(T * K, device=dev) // K
    key_N = ids_N // En * (T * En) + t_N * En + ids_N % En
    kept_ids_N = ids_N
    if keep_TK is not None:
        keep_N = keep_TK.reshape(-1)
        key_N = torch.where(keep_N, key_N, N * T * En)
        kept_ids_N = torch.where(keep_N, ids_N, E)
    # keys are unique for kept assignments (a token picks an expert once): any sort will do
    key_sorted_N, order_N = torch.sort(key_N)
    pair_N = key_sorted_N // En  # node * T + token; N * T marks a dropped assignment
    first_N = torch.ones_like(pair_N, dtype=torch.bool)
    first_N[1:] = pair_N[1:] != pair_N[:-1]
    first_N &= pair_N < N * T
    pilot_idx_N = torch.cumsum(first_N, 0) - 1
    pilots_N = count_ids(torch.where(first_N, pair_N // max(T, 1), N), N + 1)[:N]
    pilot_start_N = torch.cumsum(pilots_N, 0) - pilots_N
    node_N = (pair_N // max(T, 1)).clamp_max(N - 1)
    # stable sort of "not a pilot start" lists the pilot starts first, in replica order
    pilot_pos_N = torch.sort((~first_N).to(torch.int32), stable=True).indices
    # a replica's slot: its place among its pilot's replicas (they are contiguous)
    slot_N = torch.arange(T * K, device=dev) - pilot_pos_N[pilot_idx_N.clamp_min(0)]
    Kh = min(K, En)
    meta_N = ((pilot_idx_N - pilot_start_N[node_N]) * Kh + slot_N) * En + key_sorted_N % En

    counts_E = count_ids(kept_ids_N, E + 1)[:E]
    counts_NLE = counts_E.view(N, L, El)
    msg_NLC = torch.zeros(N, L, layout.msg_width, dtype=torch.int64, device=dev)
    msg_NLC[:, :, :El] = counts_NLE
    msg_NLC[:, layout.local, El] = pilots_N
    msg_NLC[:, layout.local, El + 1 :] = counts_NLE.sum(-1)
    return SenderPlan(order_N, meta_N, pilot_pos_N, pair_N, msg_NLC.view(layout.world, -1))


@dataclass
class Splits:
    """Every host-side size of one RBD exchange, from one host sync of the counts."""

    pilots_sent: list[int]  # [N] pilot rows to each node (inter-node send splits)
    replicas_sent: list[int]  # [N] replica metadata entries to each node
    pilots_recv: list[int]  # [N] pilot rows from each node (inter-node recv splits)
    replicas_recv: list[int]  # [N]
    intra_sent: list[int]  # [L] replica rows this holder sends to each rank of its node
    intra_recv: list[int]  # [L] rows this expert rank receives from each holder of its node
    counts_El: list[int]  # rows per local expert, as the experts see them


def host_splits(sent_WC: list[list[int]], recv_WC: list[list[int]], layout: NodeLayout) -> Splits:
    """Turn the sent and received counts messages (host lists) into every split needed."""
    N, L, El = layout.nodes, layout.node_size, layout.local_experts
    me = layout.local
    pilots_sent = [sent_WC[j * L + me][El] for j in range(N)]
    replicas_sent = [sum(sent_WC[j * L + me][El + 1 :]) for j in range(N)]
    from_holder = [recv_WC[i * L + me] for i in range(N)]  # sources that picked me as holder
    pilots_recv = [m[El] for m in from_holder]
    replicas_recv = [sum(m[El + 1 :]) for m in from_holder]
    intra_sent = [sum(m[El + 1 + lp] for m in from_holder) for lp in range(L)]
    # an expert rank gets, from holder lr, the rows of every source (i, lr) for its experts
    intra_recv = [sum(sum(recv_WC[i * L + lr][:El]) for i in range(N)) for lr in range(L)]
    counts_El = [sum(recv_WC[s][le] for s in range(layout.world)) for le in range(El)]
    return Splits(
        pilots_sent,
        replicas_sent,
        pilots_recv,
        replicas_recv,
        intra_sent,
        intra_recv,
        counts_El,
    )


@dataclass
class PilotPlan:
    """The sender's pilots as a (token, node) table, the shape the permute kernels take.

    Pilot p stands for slot t * N + j of a [T, N] table: `permute(x_TD, dest_row_TN, P)`
    copies the pilots and `unpermute(y_PD, dest_row_TN)` sums a token's
    returning rows over its nodes, both without atomics.
    """

    src_slot_P: torch.Tensor  # t * N + j of every pilot, in send order
    dest_row_TN: torch.Tensor  # pilot row of (token, node), -1 where none
    slot_Q: torch.Tensor  # flat assignment t * K + k of every replica, in send order


def pilot_plan(plan: SenderPlan, splits: Splits, T: int, top_k: int, nodes: int) -> PilotPlan:
    P, Q = sum(splits.pilots_sent), sum(splits.replicas_sent)
    slot_Q = plan.order_N[:Q]
    pos_P = plan.pilot_pos_N[:P]
    token_P = slot_Q[pos_P] // top_k
    node_P = plan.pair_N[pos_P] // max(T, 1)
    src_slot_P = token_P * nodes + node_P
    dest_row_TN = torch.full((T * nodes,), -1, dtype=torch.int64, device=slot_Q.device)
    dest_row_TN[src_slot_P] = torch.arange(P, device=slot_Q.device)
    return PilotPlan(src_slot_P, dest_row_TN.view(T, nodes), slot_Q)


@dataclass
class HolderPlan:
    """The holder's received pilots as a (pilot, replica slot) table of up to Kh replicas.

    `permute(pilots_PD, dest_row_PK, S)` makes the replicas in intra-node send order;
    `combine(y_SD, w_PK, dest_row_PK)` weights and sums them back into
    their pilots, exactly as PFT combines a token's k expert outputs.
    """

    src_slot_S: torch.Tensor  # pilot * Kh + slot of every replica, in intra-node send order
    dest_row_PK: torch.Tensor  # send row of (pilot, slot), -1 where the pilot has fewer
    w_slot_Q: torch.Tensor  # pilot * Kh + slot of every replica, in receive order


def holder_plan(
    meta_Q: torch.Tensor, recv_msg_WC: torch.Tensor, splits: Splits, layout: NodeLayout, top_k: int
) -> HolderPlan:
    """Order a holder's received replicas for the intra-node exchange: by (node expert,
    source node, token), which is (destination rank, local expert, source node, token).
    `recv_msg_WC` is the received counts message still on the device (no host copies)."""
    En, L, El = layout.experts_per_node, layout.node_size, layout.local_experts
    Kh = min(top_k, En)
    dev = meta_Q.device
    Q = meta_Q.shape[0]
    P = sum(splits.pilots_recv)
    from_holder_NC = recv_msg_WC.view(layout.nodes, L, -1)[:, layout.local]
    pilots_N = from_holder_NC[:, El]
    pilot_start_N = torch.cumsum(pilots_N, 0) - pilots_N
    chunk_Q = torch.repeat_interleave(
        torch.arange(layout.nodes, device=dev), from_holder_NC[:, El + 1 :].sum(-1), output_size=Q
    )
    # pilots are numbered by (source node, token); the sender packed each replica's slot
    w_slot_Q = meta_Q // En + pilot_start_N[chunk_Q] * Kh
    send_order_S = torch.sort(meta_Q % En * max(P * Kh, 1) + w_slot_Q).indices
    src_slot_S = w_slot_Q[send_order_S]
    dest_row_PK = torch.full((P * Kh,), -1, dtype=torch.int64, device=dev)
    dest_row_PK[src_slot_S] = torch.arange(Q, device=dev)
    return HolderPlan(src_slot_S, dest_row_PK.view(P, Kh), w_slot_Q)


def expert_order(recv_msg_WC: torch.Tensor, layout: NodeLayout, rows: int) -> torch.Tensor:
    """Gather index from the intra-node receive buffer to the expert-grouped rows.

    Received blocks come as (holder lr, local expert le, source node i); the experts take
    them as (le, i, lr), i.e. by local expert and then by source rank, as PFT hands them.
    Built on the device from the received counts, `rows` (their total) from the host.
    """
    N, L, El = layout.nodes, layout.node_size, layout.local_experts
    dev = recv_msg_WC.device
    sizes_NLE = recv_msg_WC.view(N, L, -1)[:, :, :El]
    sizes_LEN = sizes_NLE.permute(1, 2, 0).reshape(-1)
    starts_LEN = (torch.cumsum(sizes_LEN, 0) - sizes_LEN).view(L, El, N)
    tgt_sizes_B = sizes_NLE.permute(2, 0, 1).reshape(-1)  # (le, i, lr)
    tgt_starts_B = starts_LEN.permute(1, 2, 0).reshape(-1)
    shift_B = tgt_starts_B - (torch.cumsum(tgt_sizes_B, 0) - tgt_sizes_B)
    return torch.repeat_interleave(shift_B, tgt_sizes_B, output_size=rows) + torch.arange(
        rows, device=dev
    )


def node_limited_topk(
    scores_TE: torch.Tensor, top_k: int, max_nodes: int, experts_per_node: int
) -> torch.Tensor:
    """DeepSeek-V3 node-limited routing: top-k experts drawn from at most `max_nodes` nodes.

    Each node is scored by the sum of its best ceil(k / M) expert scores (k / M is how many
    experts a token takes per node on average when it uses all M nodes); the token keeps
    the top M nodes and picks its top-k experts among theirs. Returns int64 ids [T, K].
    Selection only: the caller gathers the combine weights from its own probabilities.
    """
    T, E = scores_TE.shape
    nodes = E // experts_per_node
    if max_nodes <= 0 or max_nodes >= nodes:
        return torch.topk(scores_TE, top_k, dim=-1).indices
    if max_nodes * experts_per_node < top_k:
        raise ValueError(
            f"max_nodes_per_token={max_nodes} nodes of {experts_per_node} experts cannot hold "
            f"top_k={top_k} experts: raise max_nodes_per_token"
        )
    per_node = min(experts_per_node, -(-top_k // max_nodes))
    by_node_TNX = scores_TE.view(T, nodes, experts_per_node)
    node_score_TN = torch.topk(by_node_TNX, per_node, dim=-1).values.sum(-1)
    best_nodes_TM = torch.topk(node_score_TN, max_nodes, dim=-1).indices
    allowed_TN = torch.zeros(T, nodes, dtype=torch.bool, device=scores_TE.device)
    allowed_TN.scatter_(1, best_nodes_TM, True)
    allowed_TE = allowed_TN.repeat_interleave(experts_per_node, dim=1)
    masked_TE = scores_TE.masked_fill(~allowed_TE, float("-inf"))
    return torch.topk(masked_TE, top_k, dim=-1).indices
