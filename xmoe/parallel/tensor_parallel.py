"""Megatron-style tensor parallelism with sequence parallelism, for `tp` ranks of one node.

Regions of a layer when tp > 1 (T = B*S tokens of the micro-batch, Tl = T/tp):
- sequence-parallel region (norms, residual stream, MoE blocks under SSMB): every TP rank
  holds its contiguous 1/tp slice of the flattened tokens, rows [r*Tl, (r+1)*Tl).
- tensor-parallel region (attention, dense MLP): the full sequence, with the weights split
  by heads / hidden units. `gather_sequence` enters it (forward all-gather, backward
  reduce-scatter); `reduce_scatter_sequence` leaves it after the row-parallel linear
  (forward reduce-scatter of the partial sums, backward all-gather).

Linears are sharded in place (`column_parallel_`, `row_parallel_`) after the full weight
was initialised exactly as on one rank, so a TP model starts as the same function as the
TP = 1 model, whatever tp is. Sharded parameters are tagged `tensor_model_parallel`
(DeepSpeed then counts them on every TP rank in the gradient norm).

Gradients: each rank's loss is its share of the micro-batch loss (`reduce_from_tp` sums
the shares, backward identity). Weights used in the sequence-parallel region (norms,
embedding, LM head, router, shared experts) are replicated but see only this rank's
tokens, so their gradients are summed over the TP group by a hook (`sum_grads_over_tp`)
before any engine reduces them over data parallelism, as Megatron does for its
sequence-parallel parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# the *_single names replace *_into_tensor / *_tensor in recent torch; same arguments
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class TPGroup:
    """The TP group of this rank: size, this rank's index in it, the process group."""

    size: int
    rank: int
    group: Any = None

    @classmethod
    def from_state(cls, parallel_state: Any) -> TPGroup | None:
        """None when there is no tensor parallelism (tp = 1 keeps the one-rank code path)."""
        if parallel_state is None or parallel_state.tp <= 1:
            return None
        return cls(parallel_state.tp, parallel_state.tp_rank, parallel_state.tp_group)

    def rows(self, total: int) -> slice:
        """This rank's contiguous slice of `total` rows (total divisible by the TP size)."""
        if total % self.size:
            raise ValueError(f"{total} tokens do not split over tensor-parallel size {self.size}")
        n = total // self.size
        return slice(self.rank * n, (self.rank + 1) * n)


# --------------------------------------------------------------------------- collectives


def _gather_rows(x_TD: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    x_TD = x_TD.contiguous()
    out = x_TD.new_empty(x_TD.shape[0] * tp.size, *x_TD.shape[1:])
    _all_gather(out, x_TD, group=tp.group)
    return out


def _reduce_scatter_rows(x_TD: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    x_TD = x_TD.contiguous()
    out = x_TD.new_empty(x_TD.shape[0] // tp.size, *x_TD.shape[1:])
    _reduce_scatter(out, x_TD, group=tp.group)
    return out


def _slice_rows(x_TD: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x_TD[tp.rows(x_TD.shape[0])].contiguous()


def _paired(name: str, forward: Callable, backward: Callable) -> type[torch.autograd.Function]:
    """An autograd Function running `forward(x, tp)`, whose backward is `backward(grad, tp)`."""

    def fwd(ctx, x, tp):
        ctx.tp = tp
        return forward(x, tp)

    def bwd(ctx, grad):
        return backward(grad, ctx.tp), None

    body = {"forward": staticmethod(fwd), "backward": staticmethod(bwd)}
    return type(name, (torch.autograd.Function,), body)


_GatherSequence = _paired("_GatherSequence", _gather_rows, _reduce_scatter_rows)
_ReduceScatterSequence = _paired("_ReduceScatterSequence", _reduce_scatter_rows, _gather_rows)
_ScatterReplicated = _paired("_ScatterReplicated", _slice_rows, _gather_rows)
_GatherReplicated = _paired("_GatherReplicated", _gather_rows, _slice_rows)


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        x = x.clone()
        dist.all_reduce(x, group=tp.group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def gather_sequence(x_TD: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Sequence-parallel rows -> the full sequence for a tensor-parallel region.

    Backward reduce-scatters: every rank's TP region contributes to every token's gradient.
    """
    return _GatherSequence.apply(x_TD, tp)


def reduce_scatter_sequence(x_TD: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Partial sums of a row-parallel linear over the full sequence -> this rank's rows, summed."""
    return _ReduceScatterSequence.apply(x_TD, tp)


def scatter_replicated(x_TD: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """A full sequence that every TP rank holds alike -> this rank's rows.

    Backward all-gathers: downstream of this point the TP ranks compute one replicated
    function, so each rank's input gradient is the whole sequence's.
    """
    return _ScatterReplicated.apply(x_TD, tp)


def gather_replicated(x_TD: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """This rank's rows -> the full sequence, to be used alike by every TP rank
    (backward: keep this rank's rows of the gradient)."""
    return _GatherReplicated.apply(x_TD, tp)


def reduce_from_tp(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Sum each rank's share (e.g. of the loss) over the TP group; backward is the identity,
    so each rank back-propagates exactly its own share."""
    return _ReduceFromTP.apply(x, tp)


# --------------------------------------------------------------------------- linears


def shard_tensor(weight: torch.Tensor, dim: int, tp: TPGroup, blocks: int) -> torch.Tensor:
    """This rank's 1/tp of every one of `blocks` equal blocks along `dim` (e.g. Q, K, V)."""
    size = weight.shape[dim]
    if size % (blocks * tp.size):
        raise ValueError(
            f"dimension {size} does not split into {blocks} blocks over tensor-parallel size {tp.size}"
        )
    parts = weight.chunk(blocks, dim)
    return torch.cat([p.chunk(tp.size, dim)[tp.rank] for p in parts], dim).contiguous()


def _replace_weight(linear: nn.Linear, weight: torch.Tensor, dim: int, blocks: int) -> None:
    if linear.bias is not None:
        raise ValueError("tensor-parallel linears here are bias-free")
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    linear.out_features, linear.in_features = weight.shape
    linear.weight.tensor_model_parallel = True
    linear.weight.partition_dim = dim
    linear.weight.partition_blocks = blocks


@torch.no_grad()
def column_parallel_(linear: nn.Linear, tp: TPGroup, blocks: int = 1) -> nn.Linear:
    """Keep this rank's output units (rows of `weight`): input the full sequence, output a
    1/tp slice of the features. `blocks` > 1 splits each stacked block alike (QKV)."""
    _replace_weight(linear, shard_tensor(linear.weight, 0, tp, blocks), 0, blocks)
    return linear


@torch.no_grad()
def row_parallel_(linear: nn.Linear, tp: TPGroup) -> nn.Linear:
    """Keep this rank's input units (columns of `weight`): the output is this rank's
    partial sum, to be finished by `reduce_scatter_sequence`."""
    _replace_weight(linear, shard_tensor(linear.weight, 1, tp, 1), 1, 1)
    return linear


# --------------------------------------------------------------------------- gradients


def is_tensor_parallel(p: nn.Parameter) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False))


def is_expert(p: nn.Parameter) -> bool:
    # experts carry DeepSpeed's MoE tag; their gradients reduce over expert-DP, never TP
    return getattr(p, "allreduce", True) is False


def sum_grads_over_tp(module: nn.Module, tp: TPGroup) -> list[Any]:
    """Sum over the TP group the gradient of every replicated parameter of `module`.

    Replicated = neither TP-sharded nor an expert. The hook runs on the gradient before it
    is accumulated into `.grad`, hence before any engine's reduction hooks see it; every
    TP rank has the same graph, so the all-reduces line up. Returns the hook handles.
    """

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=tp.group)
        return grad

    handles = []
    for p in module.parameters():
        if p.requires_grad and not is_tensor_parallel(p) and not is_expert(p):
            handles.append(p.register_hook(hook))
    return handles


def mark_experts_for_grad_norm(module: nn.Module) -> None:
    """Count expert gradients on every TP rank in DeepSpeed's gradient norm.

    ZeRO splits each expert's gradient over its expert-DP group, so the partitions summed
    over the whole world hold every expert once; without the tag DeepSpeed would count only
    TP rank 0's experts (it treats untagged parameters as identical over TP).
    """
    for p in module.parameters():
        if is_expert(p):
            p.tensor_model_parallel = True
