"""Autograd collectives for expert parallelism: uneven all-to-all and the counts exchange.

`all_to_all_uneven` moves rows between the ranks of the EP group with per-rank split
sizes; its backward is the same exchange with send and receive splits swapped.

Zero-size exchanges: RCCL has been seen to hang when a rank's whole send or receive
buffer is empty. A rank whose send or receive total is zero therefore adds one dummy row
sent to itself and strips it afterwards. The decision is purely local (only the rank's own
send-to-self and receive-from-self splits change, and those must agree with each other
anyway), so no extra agreement between ranks is needed, and every rank still enters the
collective: nothing is skipped, so nothing can deadlock. It costs a copy of the send
buffer only in the rare case where a rank sends rows but receives none.

`exchange_counts` sends each rank its slice of this rank's per-expert counts with one
small equal-split all-to-all on the device; the caller turns the result into host lists
with a single `.tolist()` (the one host sync per layer).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def group_size(group: Any) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def group_rank(group: Any) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def collective_device(group: Any = None) -> torch.device:
    """Where a tensor must live for a collective over `group`: NCCL (and RCCL) take only
    device tensors, gloo host ones."""
    if "nccl" in str(dist.get_backend(group)).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_host(t: torch.Tensor, group: Any = None, op: Any = None) -> torch.Tensor:
    """All-reduce a small host tensor (metrics, counters) over `group`, through the device
    the backend needs; the result is a new host tensor (`t` itself is left as it is).
    Returns `t` without distributed ranks."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    moved = t.to(collective_device(group), copy=True)
    dist.all_reduce(moved, op=op or dist.ReduceOp.SUM, group=group)
    return moved.to(t.device)


def exchange_rows(
    x_ND: torch.Tensor,
    send: list[int],
    recv: list[int],
    group: Any,
    out: torch.Tensor | None = None,
    async_op: bool = False,
) -> tuple[torch.Tensor, Any]:
    """The uneven all-to-all of `all_to_all_uneven` outside autograd: `out` (allocated when
    None; any contiguous [sum(recv), ...] tensor, e.g. the leading rows of a larger one)
    and, with `async_op`, the work to wait for before reading it (None once done). The
    padded exchange of an empty side is always done at once."""
    me = group_rank(group)
    pad = sum(send) == 0 or sum(recv) == 0
    if not pad:
        if out is None:
            out = x_ND.new_empty(sum(recv), *x_ND.shape[1:])
        work = dist.all_to_all_single(
            out, x_ND.contiguous(), recv, send, group=group, async_op=async_op
        )
        return out, work
    send, recv = list(send), list(recv)
    start = sum(send[:me])
    dummy = x_ND.new_zeros(1, *x_ND.shape[1:])
    x_ND = torch.cat([x_ND[:start], dummy, x_ND[start:]])
    send[me] += 1
    recv[me] += 1
    padded = x_ND.new_empty(sum(recv), *x_ND.shape[1:])
    dist.all_to_all_single(padded, x_ND, recv, send, group=group)
    start = sum(recv[:me])
    rows = torch.cat([padded[:start], padded[start + 1 :]])
    if out is None:
        return rows, None
    out.copy_(rows)
    return out, None


def _exchange(x_ND: torch.Tensor, send: list[int], recv: list[int], group: Any) -> torch.Tensor:
    return exchange_rows(x_ND, send, recv, group)[0]


class _AllToAllUneven(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, send, recv, group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _exchange(x_ND, send, recv, group)

    @staticmethod
    def backward(ctx, grad_ND):
        return _exchange(grad_ND, ctx.recv, ctx.send, ctx.group), None, None, None


def all_to_all_uneven(
    x_ND: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: Any = None
) -> torch.Tensor:
    """Send rows [sum(send[:j]), sum(send[:j+1])) of x_ND to rank j of `group`; return the
    rows received, ordered by source rank. Differentiable; safe with empty sends/receives."""
    if group_size(group) == 1:
        return x_ND
    if x_ND.shape[0] != sum(send_splits):
        raise ValueError(
            f"all_to_all_uneven: {x_ND.shape[0]} rows but send splits sum to {sum(send_splits)}"
        )
    return _AllToAllUneven.apply(x_ND, list(send_splits), list(recv_splits), group)


def exchange_counts(counts_E: torch.Tensor, group: Any = None) -> torch.Tensor:
    """counts_E: rows this rank sends to every global expert (experts split evenly over the
    group's ranks). Returns counts_WEl: rows each source rank sends to each of our experts."""
    W = group_size(group)
    if W == 1:
        return counts_E.view(1, -1)
    recv = torch.empty_like(counts_E)
    dist.all_to_all_single(recv, counts_E.contiguous(), group=group)
    return recv.view(W, -1)
