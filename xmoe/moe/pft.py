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
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from xmoe.config import Config
from xmoe.kernels.backend import host_to_device
from xmoe.kernels.combine import combine
from xmoe.kernels.grouped_gemm import CountsWithOffsets, DeviceCounts, RowSource
from xmoe.kernels.permute import attach_gathered, gather_rows, permute
from xmoe.kernels.routing import routing_metadata
from xmoe.moe.dispatch import Dispatched, Dispatcher, Routing
from xmoe.parallel.collectives import all_to_all_uneven, exchange_counts, group_size


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
    src_slot_S: torch.Tensor  # kept assignment (t*K+k) of each sent row
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
        if self.ep > 1 and group_size(self.group) != self.ep:
            raise ValueError(
                f"PFTDispatcher: parallel.ep={self.ep} but the EP process group has "
                f"{group_size(self.group)} ranks; create the parallel state after init_process_group"
            )

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> Dispatched:
        E, W = self.num_experts, self.ep
        El = E // W
        meta = routing_metadata(routing.topk_ids_TK, routing.keep_TK, E)
        if W == 1 and routing.keep_TK is None:
            return self._dispatch_static(x_TD, routing, meta)
        if W == 1:
            counts_dev = meta.counts_E
            local_E = meta.counts_E
        else:
            recv_WEl = exchange_counts(meta.counts_E, self.group)
            counts_dev = torch.cat([meta.counts_E, recv_WEl.reshape(-1)])
            local_E = recv_WEl.sum(0)  # rows each local expert receives, over source ranks
        # the grouped GEMM's offsets, made on the device before the host knows the counts
        offsets_El = torch.cumsum(local_E, 0).to(torch.int32)
        counts_to_host = _to_host_async(counts_dev)
        # With EP, gather the kept rows now, into a buffer of the most rows that can be
        # kept (T*K), so the GPU copies them while the host waits for the counts; rows past
        # the kept count are never written nor read, and the buffer only feeds the
        # all-to-all, whose output is exact. On one rank (dropping: dropless takes
        # `_dispatch_static`) the experts would keep that whole buffer alive until
        # backward, so it gathers after the sync, into a buffer of the exact size.
        rows_ND = None
        if W > 1:
            rows_ND = gather_rows(
                x_TD.detach(), meta.src_slot_N, meta.top_k, n_rows=meta.counts_E.sum()
            )
        host = counts_to_host()  # the one host sync
        if W == 1:
            counts_El = host
            send = recv = [sum(counts_El)]
            counts_WEl = [counts_El]
        else:
            send = [sum(host[w * El : (w + 1) * El]) for w in range(W)]
            counts_WEl = [host[E + w * El : E + (w + 1) * El] for w in range(W)]
            recv = [sum(c) for c in counts_WEl]
            counts_El = [sum(counts_WEl[w][e] for w in range(W)) for e in range(El)]

        slot_S = meta.src_slot_N[: sum(send)]
        if rows_ND is not None:
            x_SD = attach_gathered(x_TD, rows_ND[: sum(send)], meta.dest_row_TK)
        else:
            x_SD = permute(x_TD, slot_S, meta.dest_row_TK)
        x_RD = all_to_all_uneven(x_SD, send, recv, self.group)
        w_R = self._row_weights(routing, slot_S)
        if w_R is not None:
            w_R = all_to_all_uneven(w_R, send, recv, self.group)
        regroup = None
        if W > 1 and El > 1:
            regroup = _chunk_permutation(counts_WEl, x_TD.device)
            x_RD = _RowPermutation.apply(x_RD, *regroup)
            if w_R is not None:
                w_R = w_R.index_select(0, regroup[0])
        weights_TK = None if w_R is not None else routing.topk_weights_TK
        state = PFTState(meta.dest_row_TK, slot_S, weights_TK, send, recv, regroup)
        row_bytes = x_TD.shape[1] * x_TD.element_size()
        stats = {
            "rows": float(sum(counts_El)),
            "sent_rows": float(sum(send)),
            "a2a_bytes": float(row_bytes * (sum(send) - send[self._rank()])) if W > 1 else 0.0,
        }
        counts = CountsWithOffsets(counts_El, offsets_El)
        return Dispatched(
            x_RD, counts, state, stats, w_R, self._source(x_TD, slot_S, meta.top_k, W)
        )

    def _dispatch_static(self, x_TD: torch.Tensor, routing: Routing, meta) -> Dispatched:
        """Dropless on one rank: every (token, k) row is kept, so every buffer size is
        known without the counts and nothing waits for them: the host can queue the
        rest of the step while the GPU works. Only a grouped GEMM that plans its tiles
        on the host (the loop, Triton) reads the counts, and waits for them then."""
        n = routing.topk_ids_TK.numel()
        x_SD = permute(x_TD, meta.src_slot_N, meta.dest_row_TK)
        counts = DeviceCounts(torch.cumsum(meta.counts_E, 0).to(torch.int32), meta.counts_E.tolist)
        w_R = self._row_weights(routing, meta.src_slot_N)
        weights_TK = None if w_R is not None else routing.topk_weights_TK
        state = PFTState(meta.dest_row_TK, meta.src_slot_N, weights_TK, [n], [n], None)
        stats = {"rows": float(n), "sent_rows": float(n), "a2a_bytes": 0.0}
        return Dispatched(
            x_SD, counts, state, stats, w_R, self._source(x_TD, meta.src_slot_N, meta.top_k, 1)
        )

    def _source(self, x_TD: torch.Tensor, slot_S: torch.Tensor, K: int, W: int) -> RowSource | None:
        """With `moe.recompute_permute` on one rank: the experts' input rows are the
        gather of x_TD by `slot_S`, redone in backward (x_TD is kept by the router)."""
        if not self.recompute or W > 1:
            return None
        return RowSource((x_TD.detach(), slot_S), functools.partial(gather_rows, top_k=K))

    def _row_weights(self, routing: Routing, slot_S: torch.Tensor) -> torch.Tensor | None:
        """Each sent row's combine weight, when the experts apply it (`fold_weights`)."""
        if not self.fold_weights:
            return None
        return routing.topk_weights_TK.reshape(-1).index_select(0, slot_S)

    def combine(self, y_RD: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        st: PFTState = dispatched.state
        if st.regroup is not None:
            idx_R, inv_R = st.regroup
            y_RD = _RowPermutation.apply(y_RD, inv_R, idx_R)
        y_SD = all_to_all_uneven(y_RD, st.recv_splits, st.send_splits, self.group)
        return combine(y_SD, st.weights_TK, st.src_slot_S, st.dest_row_TK)

    def _rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank(self.group)
