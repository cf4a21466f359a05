"""Sequence-sharded MoE blocks (SSMB): the MoE block of a TP group on 1/tp of the tokens.

Experts are not split by TP. Under SSMB each TP rank runs router, dispatch, experts,
combine and the shared experts on its own contiguous 1/tp slice of the micro-batch's
tokens, so the TP ranks act as extra expert-parallel (or expert-data-parallel) ranks and
every MoE activation and dispatch buffer shrinks by tp. Without SSMB ("plain TP") every
TP rank runs the block on the full sequence: the same result, tp times the work and memory.

Where the tokens come from decides the data flow (`run_moe_block`):
- inside our transformer the block sits in the sequence-parallel region, so its input
  already *is* this rank's slice and its output is what the residual stream needs: SSMB
  costs no communication at all (no gather-then-slice). Plain TP all-gathers the sequence
  at entry (backward: reduce-scatter) and keeps this rank's rows of the output.
- with a replicated input (TP without sequence parallelism, X-MoE's setting), SSMB keeps
  this rank's slice at entry (backward: all-gather of the slice gradients) and all-gathers
  the outputs at exit (backward: keep this rank's slice).

Capacity (token dropping) is decided by each rank over the tokens it routes: under SSMB
over the 1/tp slice, so dropping equals a one-rank run on each slice separately, not on
the whole micro-batch. Dropless routing is exactly the one-rank result.

The balance losses stay those of the whole micro-batch (`TPRouter`): each rank adds its
share, and the shares sum to the one-rank loss and gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from xmoe.config import MoEConfig
from xmoe.moe.router import Router
from xmoe.parallel.tensor_parallel import (
    TPGroup,
    gather_replicated,
    gather_sequence,
    scatter_replicated,
)


def run_moe_block(
    block: Callable[[torch.Tensor], torch.Tensor],
    x_TD: torch.Tensor,
    tp: TPGroup,
    ssmb: bool = True,
    input_sharded: bool = True,
) -> torch.Tensor:
    """Apply `block` (token-wise: [T, D] -> [T, D]) for a TP group; see the module doc.

    `input_sharded`: x_TD is this rank's rows of the sequence (sequence parallelism), else
    the full sequence held alike by every TP rank. The output has the input's layout.
    `MoELayer` always passes sharded rows; a replicated input with ssmb off is simply the
    block on every rank (nothing to do here).
    """
    if input_sharded:
        if ssmb:
            return block(x_TD)
        full_TD = gather_sequence(x_TD, tp)
        # plain autograd slicing: this rank back-propagates only its own rows' gradient
        return block(full_TD)[tp.rows(full_TD.shape[0])]
    if ssmb:
        return gather_replicated(block(scatter_replicated(x_TD, tp)), tp)
    return block(x_TD)


class TPRouter(Router):
    """A router whose balance losses are this TP rank's share of the TP group's losses.

    Under SSMB (`sharded`) the rank routes 1/tp of the tokens: the expert loads f_E are
    summed over the TP group and the probability and z-loss means divided by all T*tp
    tokens, so the shares add up to the loss of the whole micro-batch. In plain TP every
    rank routes the whole sequence and the share is 1/tp of its loss. Only the
    `Router.reduce_load` hook differs from the one-rank router.
    """

    def __init__(
        self, cfg: MoEConfig, hidden: int, tp: TPGroup, sharded: bool, init_std: float = 0.02
    ) -> None:
        super().__init__(cfg, hidden, init_std=init_std)
        self.tp = tp
        self.sharded = sharded

    def reduce_load(self, load_E: torch.Tensor, tokens: int) -> tuple[torch.Tensor, int]:
        """The TP group's load and tokens: summed over its ranks under SSMB; in plain TP
        every rank routes the same sequence, so the group routed it tp times."""
        if not self.sharded:
            return load_E * self.tp.size, tokens * self.tp.size
        load_E = load_E.clone()
        dist.all_reduce(load_E, group=self.tp.group)
        return load_E, tokens * self.tp.size
