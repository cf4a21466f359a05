"""The one MoE dispatcher interface: dispatch (preprocess + exchange) -> experts -> combine.

Shape legend (used across xmoe/moe and xmoe/kernels): T tokens (local), D model dim,
F expert hidden, E experts (global), El local experts, K top-k, R routed rows (rows this
rank's experts receive, grouped by local expert), W ranks in the expert-parallel group.

Every implementation (`reference`, `padded`, `pft`, `rbd`, and `ssmb` wrapping any of them)
takes the same `Routing` and must produce the same output; `reference` is the ground truth.
Token dropping is decided once, by the router (`Routing.keep_TK`), so every dispatcher drops
exactly the same assignments and can be compared bit for bit against the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Routing:
    topk_ids_TK: torch.Tensor  # int64 global expert id per (token, k)
    topk_weights_TK: torch.Tensor  # combine weight per (token, k); carries the router's gradient
    keep_TK: (
        torch.Tensor | None
    )  # bool, False where capacity dropped the assignment; None = dropless
    num_experts: int
    # int64 assignments per expert before capacity, when the router counts them (its
    # balance loss needs them anyway): made on first read (`routed_E`); None: not known
    count_routed: Callable[[], torch.Tensor] | None = None

    @property
    def top_k(self) -> int:
        return self.topk_ids_TK.shape[1]

    @property
    def routed_E(self) -> torch.Tensor | None:
        return None if self.count_routed is None else self.count_routed()


@dataclass
class Dispatched:
    """What the experts of this rank receive."""

    x_RD: torch.Tensor  # rows grouped by local expert, expert 0 first
    # rows per local expert: host ints (one sync per layer at most), or a `DeviceCounts`
    # whose host values are fetched only if something reads them
    counts_El: Sequence[int]
    state: Any = None  # whatever combine needs to route the outputs back
    stats: dict[str, float] = field(default_factory=dict)  # counters for metrics (rows, bytes, ...)
    # combine weight of each row when the experts apply it (combine then sums unweighted)
    weights_R: torch.Tensor | None = None
    # how backward can rebuild x_RD rather than keep it (`moe.recompute_permute`), a
    # `xmoe.kernels.grouped_gemm.RowSource`
    x_source: Any = None


class Dispatcher(nn.Module):
    """Moves routed token rows to their experts' ranks and back.

    `dispatch` must not keep `[T, K, D]` copies alive for backward; `combine` returns
    sum_k w_tk * y_tk for each token (zero for a token whose assignments were all dropped).
    Both are differentiable: gradients flow to `x_TD`, to the expert outputs and to
    `Routing.topk_weights_TK`.
    """

    def dispatch(
        self, x_TD: torch.Tensor, routing: Routing, meanwhile: Callable[[], Any] | None = None
    ) -> Dispatched:
        """`meanwhile`: work that does not depend on the dispatch (the shared experts). A
        dispatcher that waits for the host calls it once, just before it blocks, so the
        GPU has that work queued while the host waits and then issues the exchange; one
        that does not call it leaves it to the caller."""
        raise NotImplementedError

    def run_experts(self, experts: nn.Module, dispatched: Dispatched) -> torch.Tensor:
        """The experts' outputs for `dispatched.x_RD`, in its row order. A dispatcher that
        interleaves its exchanges with the expert computation (`pft` with
        `moe.overlap_ep`) runs the experts itself here."""
        d = dispatched
        return experts(d.x_RD, d.counts_El, d.weights_R, d.x_source)

    def combine(self, y_RD: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        raise NotImplementedError
