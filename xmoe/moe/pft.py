"""PFT: padding-free token dispatch over expert parallelism.

  router ids/weights -> routing metadata (counts, rows; no sort needed on GPU)
  -> counts exchange (one small all-to-all) -> ONE host sync for every split size
     (none at all dropless on one rank, where every size is T*K)
  -> permute: one copy of each kept (token, k) row, grouped by global expert
  -> uneven all-to-all (rows for rank j are contiguous: experts are split evenly)
  -> regroup the received rows by local expert (they arrive by source rank)
  -> grouped-GEMM experts
  -> the reverse: regroup back, all-to-all back, weighted unpermute-combine.

No buffer anywhere is padded to a capacity; dropped assignments (Routing.keep_TK) are
never copied nor sent. Rows reach the experts ordered by local expert, then source rank,
then (token, k): the order RBD reproduces. For backward only index tensors and split
lists are kept: the experts scale each row by its combine weight inside their activation
(`moe.fold_combine_weights`, on by default), so the combine is a plain sum that does
not need the expert outputs; with it off, the combine keeps them for the weights' gradient.

`moe.dedup_ep` (EP > 1) sends one *pilot* row per (token, destination rank) instead of
one row per (token, k): the sender routes tokens to ranks with the same metadata kernel
(the ranks as experts, K = W), the receiver routes the pilots it holds to its local
experts (ids outside its own dropped), copies them with `permute` and sums each pilot's
expert outputs with `combine` before the row goes back. The experts see the same rows
in the same order as without it.

`moe.dedup_fixed_slots` (with dedup_ep, without overlap_ep; on by default where a token
visits >= 90 % of the ranks) gives every (token, rank) pair a pilot slot, filled or not:
each rank pair exchanges B slots, B the most tokens a rank had (agreed at the layer's
first call through the counts). Every size is then known before the counts reach the
host, so both exchanges and the receiver's routing are queued before the host sync and
the GPU works through them while the host waits; with the exact counts the GPU idles
after the sync until the host has issued them. The receiver drops the slots past each
sender's pilot count. A call with more tokens than B redoes its dispatch with the exact
counts on every rank (each sees every rank's token count in the counts it received).

`moe.overlap_ep` (EP > 1) lays the send buffer out with this rank's own rows last, so
the exchanges move only the other ranks' rows (the own rows never enter the
all-to-all), and puts expert work on the own rows beside each of the four exchanges. The
own rows' experts run in two halves, the activations (`hidden`) and the last matmul
(`project`):
  forward   start dispatch; own hidden; wait; others' experts; start return;
            own project; wait
  backward  start the return's gradient; own project backward; wait; the others'
            backward; start the dispatch's gradient; own hidden backward; wait
One autograd node (`_OverlappedExperts`) holds the four parts as graphs of their own and
differentiates them in that order; the exchanges run on the communication stream while
the compute stream works, so no side stream is needed. The weights' gradients of the
parts are summed in the node.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.graph import get_gradient_edge

from xmoe.config import Config, dedup_ep_active, dedup_fixed_active
from xmoe.kernels.backend import host_to_device
from xmoe.kernels.combine import combine
from xmoe.kernels.grouped_gemm import CountsWithOffsets, DeviceCounts, RowSource
from xmoe.kernels.permute import (
    attach_gathered,
    gather_rows,
    permute,
    permute_with_weights,
    scatter_rows,
)
from xmoe.kernels.routing import RoutingMeta, count_ids, routing_metadata
from xmoe.moe.dispatch import Dispatched, Dispatcher, Routing
from xmoe.parallel.collectives import (
    all_to_all_uneven,
    exchange_counts,
    exchange_rows,
    group_size,
)


class _RowPermutation(torch.autograd.Function):
    """out[i] = x[idx[i]] for a permutation idx; backward applies the inverse."""

    @staticmethod
    def forward(ctx, x_RD, idx_R, inv_R):
        ctx.save_for_backward(inv_R)
        return gather_rows(x_RD, idx_R, 1)

    @staticmethod
    def backward(ctx, grad_RD):
        (inv_R,) = ctx.saved_tensors
        return gather_rows(grad_RD.contiguous(), inv_R, 1), None, None


def _chunk_permutation(counts_WEl: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index turning rows ordered (source rank, local expert) into (local expert, source
    rank) order, and its inverse. Built from host counts: no sync."""
    W, El = len(counts_WEl), len(counts_WEl[0])
    src_start = {}
    pos = 0
    for w in range(W):
        for e in range(El):
            src_start[w, e] = pos
            pos += counts_WEl[w][e]
    shift, sizes, inv_shift, inv_sizes = [], [], [], []
    dst = 0
    dst_start = {}
    for e in range(El):
        for w in range(W):
            n = counts_WEl[w][e]
            dst_start[w, e] = dst
            shift.append(src_start[w, e] - dst)
            sizes.append(n)
            dst += n
    for w in range(W):
        for e in range(El):
            inv_shift.append(dst_start[w, e] - src_start[w, e])
            inv_sizes.append(counts_WEl[w][e])
    R = pos

    def build(shifts: list[int], lengths: list[int]) -> torch.Tensor:
        sn = host_to_device(shifts + lengths, device)
        s, n = sn[: len(shifts)], sn[len(shifts) :]
        return torch.repeat_interleave(s, n, output_size=R) + torch.arange(R, device=device)

    return build(shift, sizes), build(inv_shift, inv_sizes)


def _split_counts(host: list[int], W: int) -> tuple[list[int], list[list[int]], list[int]]:
    """From [this rank's rows per global expert, then counts_WEl flattened] (host ints):
    rows sent to each rank, rows each rank sends to each local expert, rows received
    from each rank."""
    E = len(host) // 2
    El = E // W
    send = [sum(host[w * El : (w + 1) * El]) for w in range(W)]
    counts_WEl = [host[E + w * El : E + (w + 1) * El] for w in range(W)]
    return send, counts_WEl, [sum(c) for c in counts_WEl]


def _rows_per_expert(counts_W: list[list[int]], El: int) -> list[int]:
    """Rows each local expert receives, summed over the source ranks' count lists (the
    first El entries of each: a list may carry more, e.g. its pilots)."""
    return [sum(c[e] for c in counts_W) for e in range(El)]


def _to_host_async(counts: torch.Tensor) -> Callable[[], list[int]]:
    """Start copying small device counts to the host; the returned function waits for that
    copy alone (not for work queued after it) and gives the list."""
    if counts.device.type != "cuda":
        return counts.tolist
    host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
    host.copy_(counts, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def wait() -> list[int]:
        done.synchronize()
        return host.tolist()

    return wait


@dataclass
class PFTState:
    """What combine needs to send the expert outputs home and sum them per token."""

    dest_row_TK: torch.Tensor
    weights_TK: torch.Tensor | None  # None: the experts applied the weights
    send_splits: list[int]
    recv_splits: list[int]
    regroup: tuple[torch.Tensor, torch.Tensor] | None


class PFTDispatcher(Dispatcher):
    """Padding-free dispatch and combine, dropless or dropping by the router's keep mask."""

    def __init__(self, cfg: Config, parallel_state: Any = None) -> None:
        super().__init__()
        self.num_experts = cfg.moe.num_experts
        self.fold_weights = cfg.moe.fold_combine_weights
        self.recompute = cfg.moe.recompute_permute
        self.group = None if parallel_state is None else parallel_state.ep_group
        self.ep = 1 if parallel_state is None else parallel_state.ep
        self.overlap = cfg.moe.overlap_ep and self.ep > 1
        # (as the RBD dispatcher's one-node fallback, with moe.dispatcher=rbd: plain)
        self.dedup = dedup_ep_active(cfg.moe, cfg.moe.dispatcher, self.ep)
        self.fixed = dedup_fixed_active(cfg.moe, cfg.moe.dispatcher, self.ep)
        self._slots: int | None = None  # moe.dedup_fixed_slots: agreed at the first call
        self._slots_taken: int | None = None  # the last call's (None: it took exact counts)
        self._consts: dict[Any, torch.Tensor] = {}
        if self.ep > 1 and group_size(self.group) != self.ep:
            raise ValueError(
                f"PFTDispatcher: parallel.ep={self.ep} but the EP process group has "
                f"{group_size(self.group)} ranks; create the parallel state after init_process_group"
            )

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, meanwhile=None) -> Dispatched:
        E, W = self.num_experts, self.ep
        El = E // W
        if self.dedup:
            return self._dispatch_dedup(x_TD, routing, meanwhile)
        if self.overlap:
            return self._dispatch_overlapped(x_TD, routing, meanwhile)
        meta = routing_metadata(
            routing.topk_ids_TK, routing.keep_TK, E, all_kept=routing.keep_TK is None
        )
        if W == 1 and routing.keep_TK is None:
            return self._dispatch_static(x_TD, routing, meta, meanwhile)
        # the grouped GEMM's offsets, made on the device before the host knows the counts
        if W == 1:
            counts_dev = meta.counts_E
            offsets_El = meta.offsets_E
        else:
            recv_WEl = exchange_counts(meta.counts_E, self.group)
            counts_dev = torch.cat([meta.counts_E, recv_WEl.reshape(-1)])
            # rows each local expert receives, over source ranks
            offsets_El = torch.cumsum(recv_WEl.sum(0), 0).to(torch.int32)
        counts_to_host = _to_host_async(counts_dev)
        # With EP, copy the kept rows now, into a buffer of the most rows that can be
        # kept (T*K), so the GPU copies them while the host waits for the counts; rows past
        # the kept count are never written nor read, and the buffer only feeds the
        # all-to-all, whose output is exact. On one rank (dropping: dropless takes
        # `_dispatch_static`) the experts would keep that whole buffer alive until
        # backward, so it copies after the sync, into a buffer of the exact size.
        rows_ND = None
        if W > 1:
            rows_ND = scatter_rows(x_TD.detach(), meta.dest_row_TK, meta.src_slot_N.numel())
        if meanwhile is not None:
            meanwhile()
        host = counts_to_host()  # the one host sync
        if W == 1:
            counts_El = host
            send = recv = [sum(counts_El)]
            counts_WEl = [counts_El]
        else:
            send, counts_WEl, recv = _split_counts(host, W)
            counts_El = _rows_per_expert(counts_WEl, El)

        slot_S = meta.src_slot_N[: sum(send)]
        if rows_ND is not None:
            x_SD = attach_gathered(x_TD, rows_ND[: sum(send)], meta.dest_row_TK)
            w_R = self._row_weights(routing, slot_S)
        else:
            x_SD, w_R = self._permute(x_TD, routing, meta.dest_row_TK, sum(send))
        x_RD = all_to_all_uneven(x_SD, send, recv, self.group)
        if w_R is not None:
            w_R = all_to_all_uneven(w_R, send, recv, self.group)
        regroup = None
        if W > 1 and El > 1:
            regroup = _chunk_permutation(counts_WEl, x_TD.device)
            x_RD = _RowPermutation.apply(x_RD, *regroup)
            if w_R is not None:
                w_R = w_R.index_select(0, regroup[0])
        weights_TK = None if w_R is not None else routing.topk_weights_TK
        state = PFTState(meta.dest_row_TK, weights_TK, send, recv, regroup)
        row_bytes = x_TD.shape[1] * x_TD.element_size()
        stats = {
            "rows": float(sum(counts_El)),
            "sent_rows": float(sum(send)),
            "a2a_bytes": float(row_bytes * (sum(send) - send[self._rank()])) if W > 1 else 0.0,
        }
        counts = CountsWithOffsets(counts_El, offsets_El)
        return Dispatched(
            x_RD, counts, state, stats, w_R, self._source(x_TD, meta.dest_row_TK, sum(send), W)
        )

    def _dispatch_static(self, x_TD: torch.Tensor, routing: Routing, meta, meanwhile) -> Dispatched:
        """Dropless on one rank: every (token, k) row is kept, so every buffer size is
        known without the counts and nothing waits for them: the host can queue the
        rest of the step while the GPU works. Only a grouped GEMM that plans its tiles
        on the host (the loop, Triton) reads the counts, and waits for them then.
        `meanwhile` (the shared experts) is queued before the permute, behind the router
        and the routing metadata: with nothing to wait for, it keeps the GPU busy while
        the host issues the rest of the dispatch."""
        if meanwhile is not None:
            meanwhile()
        n = routing.topk_ids_TK.numel()
        x_SD, w_R = self._permute(x_TD, routing, meta.dest_row_TK, n)
        counts = DeviceCounts(meta.offsets_E)
        weights_TK = None if w_R is not None else routing.topk_weights_TK
        state = PFTState(meta.dest_row_TK, weights_TK, [n], [n], None)
        stats = {"rows": float(n), "sent_rows": float(n), "a2a_bytes": 0.0}
        return Dispatched(
            x_SD, counts, state, stats, w_R, self._source(x_TD, meta.dest_row_TK, n, 1)
        )

    def _source(
        self, x_TD: torch.Tensor, dest_row_TK: torch.Tensor, R: int, W: int
    ) -> RowSource | None:
        """With `moe.recompute_permute` on one rank: the experts' input rows are the
        copy of x_TD to `dest_row_TK`'s R rows, redone in backward (x_TD is kept by the
        router)."""
        if not self.recompute or W > 1:
            return None
        return RowSource((x_TD.detach(), dest_row_TK), functools.partial(scatter_rows, n_rows=R))

    def _permute(
        self, x_TD: torch.Tensor, routing: Routing, dest_row_TK: torch.Tensor, n: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The n kept rows in expert order and, when the experts apply the combine
        weights (`fold_weights`), each row's weight from the same kernel."""
        if self.fold_weights:
            return permute_with_weights(x_TD, routing.topk_weights_TK, dest_row_TK, n)
        return permute(x_TD, dest_row_TK, n), None

    def _row_weights(self, routing: Routing, slot_S: torch.Tensor) -> torch.Tensor | None:
        """Each sent row's combine weight, when the experts apply it (`fold_weights`)."""
        if not self.fold_weights:
            return None
        return routing.topk_weights_TK.reshape(-1).index_select(0, slot_S)

    def combine(self, y_RD: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        if isinstance(dispatched.state, _DedupState):
            st = dispatched.state
            y_PD = st.part.reduce(y_RD, st.weights_PK)  # one row per held pilot
            y_PD = all_to_all_uneven(y_PD, st.recv_splits, st.send_splits, self.group)
            return combine(y_PD, None, st.pilot_dest_TW)  # sum over ranks
        if isinstance(dispatched.state, _OverlapState):
            st = dispatched.state  # y_RD is already in the send buffer's order (run_experts)
            return combine(y_RD, st.weights_TK, st.dest_row_TK)
        st: PFTState = dispatched.state
        if st.regroup is not None:
            idx_R, inv_R = st.regroup
            y_RD = _RowPermutation.apply(y_RD, inv_R, idx_R)
        y_SD = all_to_all_uneven(y_RD, st.recv_splits, st.send_splits, self.group)
        return combine(y_SD, st.weights_TK, st.dest_row_TK)

    # ------------------------------------------------------------------ moe.dedup_ep

    def _dispatch_dedup(self, x_TD: torch.Tensor, routing: Routing, meanwhile) -> Dispatched:
        """One *pilot* row per (token, destination rank) crosses, with the token's expert
        ids and combine weights; the receiver copies each pilot to the experts it chose
        there (PFT's permute over the pilots, ids outside this rank's experts dropped) and
        combine sums them per pilot before the row goes back. Both halves are PFT's own
        kernels: the sender "routes" each token to the ranks of its experts (K = W), the
        receiver routes the pilots to its local experts. The experts see PFT's rows in
        PFT's order (local expert, source rank, token). With `overlap_ep` the own pilots
        come last and stay out of the exchanges."""
        W, me, El = self.ep, self._rank(), self.num_experts // self.ep
        if self.fixed:
            # a forward recomputed in backward (activation checkpointing) must take the
            # path its first run took, whatever slots were agreed since
            B = self._slots_taken if _in_backward() else self._slots
            self._slots_taken = None
            if B is not None:
                out = self._dispatch_fixed(x_TD, routing, B, meanwhile)
                if out is not None:
                    self._slots_taken = B
                    return out
                meanwhile = None  # called; every rank redoes the dispatch with exact counts
        pl = _plan_pilots(x_TD, routing, W, me, El, self.group, self.overlap, meanwhile)
        if self.fixed:
            self._slots = _most_tokens(pl.counts_WC)
        x_SD, ids_SK, w_SK = pl.x_SD, pl.ids_SK, pl.w_SK
        S = x_SD.shape[0]
        row_bytes = x_TD.shape[1] * x_TD.element_size()
        stats = {
            "rows": float(sum(sum(c[:El]) for c in pl.counts_WC)),
            "sent_rows": float(S),
            "a2a_bytes": float(row_bytes * (S - pl.send[me])),
        }
        if self.overlap:
            own = pl.send[me]
            send_o = [0 if w == me else n for w, n in enumerate(pl.send)]
            recv_o = [0 if w == me else n for w, n in enumerate(pl.recv)]
            ids_PK, _ = exchange_rows(ids_SK[: S - own], send_o, recv_o, self.group)
            counts_other = _rows_per_expert(pl.counts_WC[:me] + pl.counts_WC[me + 1 :], El)
            st = _OverlapState(
                pl.dest_TW, None, _Exchange(send_o, recv_o, self.group), own,
                _pilot_part(
                    _held_routing(ids_SK[S - own :], me, El), pl.counts_WC[me][:El],
                    self.fold_weights,
                ),
                _pilot_part(_held_routing(ids_PK, me, El), counts_other, self.fold_weights),
            )  # fmt: skip
            return Dispatched(x_SD, st.own_part.counts, st, stats, w_SK, None)
        x_PD = all_to_all_uneven(x_SD, pl.send, pl.recv, self.group)
        K = ids_SK.shape[1]
        meta_PC = all_to_all_uneven(pl.meta_SC, pl.send, pl.recv, self.group)
        w_PK, ids_PK = _unpack_meta(meta_PC, K, w_SK.dtype)
        counts_El = _rows_per_expert(pl.counts_WC, El)
        held = _held_routing(ids_PK, me, El)
        part = _pilot_part(held, counts_El, self.fold_weights, pl.held_offsets_El)
        x_RD, w_R = part.expand(x_PD, w_PK)
        state = _DedupState(pl.dest_TW, part, None if self.fold_weights else w_PK, pl.send, pl.recv)
        return Dispatched(x_RD, part.counts, state, stats, w_R, None)

    def _dispatch_fixed(
        self, x_TD: torch.Tensor, routing: Routing, B: int, meanwhile
    ) -> Dispatched | None:
        """`moe.dedup_fixed_slots`: each rank sends every other rank B pilot slots (B: the
        largest token count of the last call, as every rank saw it in the counts), pilot
        (token t, rank w) in slot w * B + (its rank among the tokens visiting w). Every
        size is known before the counts, so both exchanges and the receiver's routing are
        queued before the host sync: the GPU works through them while the host waits. The
        receiver drops the slots past each sender's pilot count. None when some rank had
        more than B tokens (then its pilots did not fit; every rank sees that in the
        counts and redoes the dispatch with them)."""
        W, me, El = self.ep, self._rank(), self.num_experts // self.ep
        T, K, D = x_TD.shape[0], routing.top_k, x_TD.shape[1]
        ranks_W = self._constant(("ranks", W), lambda dev: torch.arange(W, device=dev), x_TD.device)
        ids_TK, visits_TW = _ranks_visited(routing, ranks_W, El)
        pilots_W = visits_TW.sum(0)
        recv_WC = exchange_counts(_counts_message(routing, ids_TK, pilots_W, W, El, T), self.group)
        counts_to_host = _to_host_async(recv_WC.reshape(-1))
        w_TK = routing.topk_weights_TK
        if T <= B:
            # the slot of pilot (t, w): w * B - 1 + the tokens up to t visiting w
            first_W = self._constant(
                ("first", W, B), lambda dev: torch.arange(W, device=dev) * B - 1, x_TD.device
            )
            # (scanned along the tokens as [W, T] rows: torch's scan down the columns of
            # [T, W] runs one thread per column and took 1.5 ms at T = 16384, W = 2)
            visits_WT = visits_TW.t().to(torch.int64, memory_format=torch.contiguous_format)
            slot_WT = torch.where(visits_WT > 0, visits_WT.cumsum(1) + first_W[:, None], -1)
            slot_TW = slot_WT.t().contiguous()
            x_SD = permute(x_TD, slot_TW, W * B)
            meta_SC = permute(_pack_meta(w_TK, ids_TK), slot_TW, W * B)
        else:  # sizes as agreed, contents never read: every rank redoes the dispatch
            slot_TW = None
            x_SD = x_TD.new_zeros(W * B, D)
            meta_SC = x_TD.new_zeros(W * B, 2 * K, dtype=torch.float32)
        splits = [B] * W
        x_QD = all_to_all_uneven(x_SD, splits, splits, self.group)
        meta_QC = all_to_all_uneven(meta_SC, splits, splits, self.group)
        # the receiver's half: slots past a sender's pilot count hold no pilot (-1: dropped)
        slot_B = self._constant(("slot", B), lambda dev: torch.arange(B, device=dev), x_TD.device)
        filled_Q = (slot_B < recv_WC[:, El, None]).reshape(-1, 1)
        meta_QC = torch.where(filled_Q, meta_QC, -1.0)  # (and finite weights: never NaN)
        w_QK, ids_QK = _unpack_meta(meta_QC, K, w_TK.dtype)
        held = _held_routing(ids_QK, me, El)
        if meanwhile is not None:
            meanwhile()
        host = counts_to_host()  # the one host sync
        counts_WC = _read_messages(host, W, El)
        self._slots = _most_tokens(counts_WC)
        if self._slots > B:
            return None
        counts_El = _rows_per_expert(counts_WC, El)
        part = _pilot_part(held, counts_El, self.fold_weights)
        x_RD, w_R = part.expand(x_QD, w_QK)
        state = _DedupState(slot_TW, part, None if self.fold_weights else w_QK, splits, splits)
        row_bytes = D * x_TD.element_size()
        stats = {
            "rows": float(sum(counts_El)),
            "sent_rows": float(W * B),
            "a2a_bytes": float(row_bytes * (W - 1) * B),
        }
        return Dispatched(x_RD, part.counts, state, stats, w_R, None)

    def _constant(self, key: tuple, make: Callable[[Any], torch.Tensor], device) -> torch.Tensor:
        """A small index tensor made once per device."""
        t = self._consts.get((key, device))
        if t is None:
            t = self._consts[key, device] = make(device)
        return t

    # ------------------------------------------------------------------ moe.overlap_ep

    def _self_last(self, device) -> torch.Tensor:
        """Global expert id -> its position when this rank's experts come last and the
        other ranks' keep their order: the send buffer's layout under `overlap_ep`
        (made once per device)."""

        def make(dev) -> torch.Tensor:
            W, El, me = self.ep, self.num_experts // self.ep, self._rank()
            order = [w for w in range(W) if w != me] + [me]
            pos = [0] * self.num_experts
            for slot, w in enumerate(order):
                for e in range(El):
                    pos[w * El + e] = slot * El + e
            return host_to_device(pos, dev)

        return self._constant(("self_last",), make, device)

    def _dispatch_overlapped(self, x_TD: torch.Tensor, routing: Routing, meanwhile) -> Dispatched:
        """Counts, the one host sync and the send buffer; no rows move yet (`run_experts`)."""
        E, W, me = self.num_experts, self.ep, self._rank()
        El = E // W
        pos_E = self._self_last(routing.topk_ids_TK.device)
        meta = routing_metadata(
            pos_E[routing.topk_ids_TK], routing.keep_TK, E, all_kept=routing.keep_TK is None
        )
        counts_E = meta.counts_E.index_select(0, pos_E)  # back to global expert order
        recv_WEl = exchange_counts(counts_E, self.group)
        counts_to_host = _to_host_async(torch.cat([counts_E, recv_WEl.reshape(-1)]))
        # the grouped GEMMs' offsets of both halves, made on the device before the sync
        own_El = recv_WEl[me]
        offsets = torch.cumsum(torch.stack([own_El, recv_WEl.sum(0) - own_El]), 1)
        offsets = offsets.to(torch.int32)
        rows_ND = scatter_rows(x_TD.detach(), meta.dest_row_TK, meta.src_slot_N.numel())
        if meanwhile is not None:
            meanwhile()
        send, counts_WEl, recv = _split_counts(counts_to_host(), W)  # the one host sync
        S, own = sum(send), send[me]
        slot_S = meta.src_slot_N[:S]
        x_SD = attach_gathered(x_TD, rows_ND[:S], meta.dest_row_TK)
        w_S = self._row_weights(routing, slot_S)
        others = [counts_WEl[w] for w in range(W) if w != me]
        send_o = [0 if w == me else n for w, n in enumerate(send)]
        recv_o = [0 if w == me else n for w, n in enumerate(recv)]
        plan = _Exchange(send_o, recv_o, self.group)
        regroup = None
        if W > 2 and El > 1:
            regroup = _chunk_permutation(others, x_TD.device)
        rem_El = _rows_per_expert(others, El)
        rem = _Part(CountsWithOffsets(rem_El, offsets[1]), regroup)
        st = _OverlapState(
            meta.dest_row_TK, None if w_S is not None else routing.topk_weights_TK,
            plan, own, _Part(CountsWithOffsets(counts_WEl[me], offsets[0])), rem,
        )  # fmt: skip
        row_bytes = x_TD.shape[1] * x_TD.element_size()
        stats = {
            "rows": float(sum(recv)),
            "sent_rows": float(S),
            "a2a_bytes": float(row_bytes * (S - own)),
        }
        return Dispatched(x_SD, counts_WEl[me], st, stats, w_S, None)

    def run_experts(self, experts: torch.nn.Module, dispatched: Dispatched) -> torch.Tensor:
        st = dispatched.state
        if not isinstance(st, _OverlapState):
            return super().run_experts(experts, dispatched)
        params = [p for p in experts.parameters() if p.requires_grad]
        return _OverlappedExperts.apply(dispatched.x_RD, dispatched.weights_R, st, experts, *params)

    def _rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank(self.group)


@dataclass
class _Part:
    """Rows that arrive at the experts as one block (all of them, or under `overlap_ep` the
    own or the other ranks' ones): how they become expert rows grouped by local expert,
    and how the experts' outputs go back to the arrival order. Arrival rows are PFT rows
    regrouped by `perm` (or already in order), or pilots (`moe.dedup_ep`) copied to the
    rows `dest_row_PK` names and summed back per pilot."""

    counts: list[int]  # expert rows per local expert
    perm: tuple[torch.Tensor, torch.Tensor] | None = None  # (source, expert) -> (expert, source)
    dest_row_PK: torch.Tensor | None = None  # (pilot, k) -> expert row, -1 if not here
    fold: bool = True  # the experts apply the combine weights

    def expand(
        self, x: torch.Tensor, w: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Arrival rows (and their weights: one per row, or [P, K] per pilot) -> expert
        rows and, when the experts fold them in, each expert row's weight."""
        if self.dest_row_PK is not None:
            n = sum(self.counts)
            if self.fold:  # each expert row's weight from the copy's own kernel
                return permute_with_weights(x, w, self.dest_row_PK, n)
            return permute(x, self.dest_row_PK, n), None
        if self.perm is not None:
            x = _RowPermutation.apply(x, *self.perm)
            w = None if w is None else _RowPermutation.apply(w, *self.perm)
        return x, w

    def reduce(self, y: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        """Expert outputs -> arrival order (pilots: the sum of each pilot's rows, weighted
        by `w` [P, K] unless the experts applied the weights)."""
        if self.dest_row_PK is not None:
            return combine(y, None if self.fold else w, self.dest_row_PK)
        if self.perm is not None:
            y = _RowPermutation.apply(y, self.perm[1], self.perm[0])
        return y


def _held_routing(ids_PK: torch.Tensor, me: int, El: int) -> RoutingMeta:
    """PFT's routing over pilots with their tokens' global expert ids (-1: dropped): the
    rows of the experts they chose on rank `me` (other ranks' ids count as not kept)."""
    return routing_metadata(ids_PK, None, El, first=me * El)


def _pilot_part(
    held: RoutingMeta, counts: list[int], fold: bool, offsets: torch.Tensor | None = None
) -> _Part:
    """The part that copies each pilot to the rows `held` gives it. `offsets`: the int32
    end row of each local expert, when already made (else the routing's)."""
    offsets = held.offsets_E if offsets is None else offsets
    return _Part(CountsWithOffsets(counts, offsets), None, held.dest_row_TK, fold)


@dataclass
class _Pilots:
    """The sender's pilots after the host sync (`_plan_pilots`)."""

    x_SD: torch.Tensor  # one row per (token, destination rank), grouped by rank
    ids_SK: torch.Tensor  # each pilot's token's expert ids (-1: dropped)
    w_SK: torch.Tensor  # and combine weights
    # without `self_last`: [weights | ids] as fp32 columns (one exchange carries both),
    # and the int32 end row of each local expert over the pilots this rank will hold
    meta_SC: torch.Tensor | None
    held_offsets_El: torch.Tensor | None
    dest_TW: torch.Tensor  # (token, rank position) -> pilot, -1 where none
    send: list[int]  # pilots to each rank
    recv: list[int]  # pilots from each rank
    # rows each rank sends to each local expert, then its pilots and its token count
    counts_WC: list[list[int]]


def _pack_meta(w_NK: torch.Tensor, ids_NK: torch.Tensor) -> torch.Tensor:
    """A pilot's weights and expert ids as one fp32 row [N, 2K], so that one exchange
    carries both: the ids travel as floats (exact below 2**24 experts)."""
    return torch.cat([w_NK.float(), ids_NK.float()], 1)


def _unpack_meta(
    meta_NC: torch.Tensor, K: int, w_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_pack_meta`'s rows back to (weights in `w_dtype`, int64 ids)."""
    return meta_NC[:, :K].to(w_dtype), meta_NC[:, K:].long()


def _in_backward() -> bool:
    """Whether autograd's engine is running this code (a checkpointed forward being
    recomputed)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def _ranks_visited(
    routing: Routing, ranks_W: torch.Tensor, El: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept expert ids (-1 where dropped) and (token, rank) visited: one of the token's
    kept experts lives on that rank (-1 // El = -1 matches no rank)."""
    ids_TK = routing.topk_ids_TK.long()
    if routing.keep_TK is not None:
        ids_TK = torch.where(routing.keep_TK, ids_TK, -1)
    return ids_TK, (ids_TK.div(El, rounding_mode="floor")[:, :, None] == ranks_W).any(1)


def _counts_message(
    routing: Routing, ids_TK: torch.Tensor, pilots_W: torch.Tensor, W: int, El: int, T: int
) -> torch.Tensor:
    """What each rank tells rank w, [W, El + 2] flattened: the rows it sends to each of
    w's experts, its pilots to w, and its token count."""
    if routing.keep_TK is None and routing.routed_E is not None:
        counts_E = routing.routed_E  # dropless: the router's count is the kept count
    else:
        counts_E = count_ids(torch.where(ids_TK >= 0, ids_TK, W * El), W * El + 1)[:-1]
    tokens = pilots_W.new_full((W, 1), T)
    return torch.cat([counts_E.view(W, El), pilots_W.view(W, 1), tokens], 1).reshape(-1)


def _read_messages(host: list[int], W: int, El: int) -> list[list[int]]:
    """The `_counts_message`s this rank received (host ints), one list per source rank."""
    C = El + 2
    return [host[w * C : (w + 1) * C] for w in range(W)]


def _most_tokens(counts_WC: list[list[int]]) -> int:
    """The most tokens any rank had, from the messages (their last entry)."""
    return max(c[-1] for c in counts_WC)


def _plan_pilots(
    x_TD: torch.Tensor,
    routing: Routing,
    W: int,
    me: int,
    El: int,
    group: Any,
    self_last: bool,
    meanwhile: Callable[[], Any] | None = None,
) -> _Pilots:
    """The sender's half of `moe.dedup_ep`: route each token to the ranks of its kept
    experts (PFT's routing metadata with the ranks as experts and K = W), exchange the
    counts (rows per expert and pilots per rank, one all-to-all), make the one host sync,
    and gather the pilots. `self_last`: the own rank's pilots come last."""
    T, dev = x_TD.shape[0], x_TD.device
    K = routing.top_k
    ranks_W = torch.arange(W, device=dev)
    ids_TK, visits_TW = _ranks_visited(routing, ranks_W, El)
    if self_last:  # by rank position: the own rank's column last (a roll, no index tensor)
        visits_TW = torch.cat(
            [visits_TW[:, :me], visits_TW[:, me + 1 :], visits_TW[:, me : me + 1]], 1
        )
    pil = routing_metadata(ranks_W.expand(T, W), visits_TW, W)
    pilots_W = pil.counts_E  # by rank
    if self_last:
        pilots_W = torch.cat([pilots_W[:me], pilots_W[W - 1 :], pilots_W[me : W - 1]])
    recv_WC = exchange_counts(_counts_message(routing, ids_TK, pilots_W, W, El, T), group)
    counts_to_host = _to_host_async(torch.cat([pilots_W, recv_WC.reshape(-1)]))
    # gather the pilots, their ids and weights while the host waits, into buffers of the
    # most pilots there can be (a token has at most min(W, K)); past the count, unread
    bound = T * min(W, K)
    slot_B = pil.src_slot_N[:bound]
    rows_ND = scatter_rows(x_TD.detach(), pil.dest_row_TK, bound)
    token_B = slot_B // W  # (entries past the count index token 0: valid, never read)
    ids_BK = ids_TK.index_select(0, token_B)
    w_BK = routing.topk_weights_TK.index_select(0, token_B)
    meta_BC = held_offsets = None
    if not self_last:  # (the overlap exchanges the ids alone, and splits the experts' rows)
        meta_BC = _pack_meta(w_BK, ids_BK)  # one exchange for both
        # the grouped GEMMs' offsets over the pilots this rank will hold, from the counts
        # every rank sent (rows per local expert), made before the host has them
        held_El = recv_WC[:, :El].sum(0)
        held_offsets = torch.cumsum(held_El, 0).to(torch.int32)
    if meanwhile is not None:
        meanwhile()
    host = counts_to_host()  # the one host sync
    counts_WC = _read_messages(host[W:], W, El)
    send, recv = host[:W], [c[El] for c in counts_WC]
    S = sum(send)
    return _Pilots(
        attach_gathered(x_TD, rows_ND[:S], pil.dest_row_TK), ids_BK[:S], w_BK[:S],
        None if meta_BC is None else meta_BC[:S], held_offsets,
        pil.dest_row_TK, send, recv, counts_WC,
    )  # fmt: skip


@dataclass
class _DedupState:
    """What combine needs under `moe.dedup_ep`: the receiver's sum per pilot, the way
    back, and the sender's sum over the ranks each token went to."""

    pilot_dest_TW: torch.Tensor  # (token, rank) -> sent pilot row, -1 where none
    part: _Part  # the held pilots -> expert rows, and back
    weights_PK: torch.Tensor | None  # the held pilots' weights; None: the experts applied them
    send_splits: list[int]  # pilots sent to each rank
    recv_splits: list[int]  # pilots held from each rank


# ---------------------------------------------------------------------- moe.overlap_ep


@dataclass
class _OverlapState:
    """What `run_experts` and combine need when the own rows stay out of the exchanges."""

    dest_row_TK: torch.Tensor  # the final combine's (token, k or rank) -> send buffer row
    weights_TK: torch.Tensor | None
    plan: _Exchange
    own: int  # this rank's own rows: the last `own` rows of the send buffer
    own_part: _Part  # the own rows -> expert rows, and back
    rem_part: _Part  # the other ranks' rows, as they arrive -> expert rows, and back


class _Exchange:
    """One layer's uneven all-to-all of the other ranks' rows (send -> recv splits; `back`
    for recv -> send), started and later waited for: the rows, and with them their combine
    weights when the experts fold them in."""

    def __init__(self, send: list[int], recv: list[int], group: Any) -> None:
        self.send, self.recv, self.group = send, recv, group
        self._works: list = []

    def start(
        self, x_ND: torch.Tensor, out: torch.Tensor | None = None, back: bool = False
    ) -> torch.Tensor:
        """Start exchanging `x_ND`'s rows (into `out` when given); the result may be read
        only after `wait`."""
        send, recv = (self.recv, self.send) if back else (self.send, self.recv)
        out, work = exchange_rows(x_ND, send, recv, self.group, out=out, async_op=True)
        if work is not None:
            self._works.append(work)
        return out

    def wait(self) -> None:
        """Wait for every exchange started since the last wait."""
        for work in self._works:
            work.wait()  # on a GPU: the current stream waits, not the host
        self._works.clear()


def _leaf(t: torch.Tensor | None, grad: bool) -> torch.Tensor | None:
    return None if t is None else t.detach().requires_grad_(grad)


def _edge(out: torch.Tensor) -> Any:
    """Where `out`'s gradient enters its graph (None without one): what `_vjp` needs of
    it, so that its storage need not be kept until backward."""
    return None if out.grad_fn is None else get_gradient_edge(out)


def _vjp(edge: Any, inputs: list, grad: torch.Tensor | None) -> list:
    """Gradients for `inputs` of the output whose `_edge` this is (a graph made in
    `_OverlappedExperts.forward`), given its gradient; None where an input is None, unused
    or nothing requires a gradient."""
    idx = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    grads: list = [None] * len(inputs)
    if not idx or edge is None or grad is None:
        return grads
    got = torch.autograd.grad([edge], [inputs[i] for i in idx], [grad], allow_unused=True)
    for i, g in zip(idx, got):
        grads[i] = g
    return grads


def _or_zeros(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_zeros(like.shape) if g is None else g


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a.add_(b)


class _OverlappedExperts(torch.autograd.Function):
    """The experts of `moe.overlap_ep`: send buffer x_SD (the other ranks' rows, then the own
    rows) -> outputs in the same order, with each of the four exchanges beside expert
    work on the own rows, which needs none (the own experts split in two halves, the
    activations `hidden` and the projection `project`):

      forward   start dispatch; own hidden; wait; others' experts; start return;
                own project; wait
      backward  start return's gradient; own project backward; wait; others' backward;
                start dispatch's gradient; own hidden backward; wait

    The four parts are autograd graphs of their own, made in forward and differentiated
    in backward in that order, so no other node can run between them; the exchanges run
    on the communication stream while the compute stream works. The expert weights'
    gradients of the parts are summed and returned as this node's."""

    @staticmethod
    def forward(ctx, x_SD, w_S, st, experts, *params):
        plan, n_other = st.plan, x_SD.shape[0] - st.own
        grad = any(ctx.needs_input_grad)
        gx, gw = ctx.needs_input_grad[:2]
        x_src = plan.start(x_SD[:n_other])
        w_src = w_own = None
        if w_S is not None:  # the rows' combine weights travel with them
            w_src, w_own = plan.start(w_S[:n_other]), w_S[n_other:]
        y_SD = x_SD.new_empty(x_SD.shape[0], experts.w2_EDF.shape[1])
        own, rem = st.own_part, st.rem_part
        with torch.set_grad_enabled(grad):
            # kept for backward as a copy: a view would keep the whole send buffer (the
            # dispatch's gather into room for every row that can be kept) alive with it
            x_own = x_SD[n_other:].clone() if grad else x_SD[n_other:]
            x_own, w_own = _leaf(x_own, gx), _leaf(w_own, gw)
            xe_own, we_own = own.expand(x_own, w_own)
            a_own = experts.hidden(xe_own, own.counts, we_own)
            plan.wait()
            x_src, w_src = _leaf(x_src, gx), _leaf(w_src, gw)
            x_rem, w_rem = rem.expand(x_src, w_src)
            y_rem = rem.reduce(experts(x_rem, rem.counts, w_rem), w_src)
            plan.start(y_rem.detach(), out=y_SD[:n_other], back=True)
            a_mid = _leaf(a_own, a_own.requires_grad)
            y_own = own.reduce(experts.project(a_mid, own.counts), w_own)
            y_SD[n_other:] = y_own.detach()
            plan.wait()
        if grad:
            # the outputs' edges, not the outputs (they are in y_SD now)
            ctx.own = (x_own, w_own, _edge(a_own), a_mid, _edge(y_own))
            ctx.rem = (x_src, w_src, _edge(y_rem))
            ctx.plan, ctx.params = plan, params
        return y_SD

    @staticmethod
    def backward(ctx, g_SD):
        x_own, w_own, e_hidden, a_mid, e_own = ctx.own
        x_src, w_src, e_rem = ctx.rem
        plan, params = ctx.plan, list(ctx.params)
        del ctx.own, ctx.rem
        n_other = sum(plan.send)
        g_SD = g_SD.contiguous()
        g_rem = plan.start(g_SD[:n_other])
        g_mid, g_wown, *gp = _vjp(e_own, [a_mid, w_own, *params], g_SD[n_other:])
        plan.wait()
        g_src, g_wsrc, *gp_rem = _vjp(e_rem, [x_src, w_src, *params], g_rem)
        gp = [_add(a, b) for a, b in zip(gp_rem, gp)]
        g_x = g_SD.new_empty(n_other + x_own.shape[0], x_own.shape[1])
        plan.start(_or_zeros(g_src, x_src), out=g_x[:n_other], back=True)
        g_w = None
        if w_src is not None and ctx.needs_input_grad[1]:
            g_w = w_src.new_empty(n_other + w_own.shape[0], *w_src.shape[1:])
            plan.start(_or_zeros(g_wsrc, w_src), out=g_w[:n_other], back=True)
        g_own, g_wh, *gp_own = _vjp(e_hidden, [x_own, w_own, *params], g_mid)
        gp = [_add(a, b) for a, b in zip(gp, gp_own)]
        g_wown = _add(g_wown, g_wh)
        g_x[n_other:] = _or_zeros(g_own, x_own)
        if g_w is not None:
            g_w[n_other:] = _or_zeros(g_wown, w_own)
        plan.wait()
        return g_x, g_w, None, None, *gp
