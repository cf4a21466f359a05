"""The ground-truth dispatcher: a plain per-expert loop on one rank (EP = 1).

Every faster dispatcher is tested against this one. It favours obviousness over speed:
for each expert, pick the kept (token, k) assignments routed to it in token order, copy
those rows, and on the way back add each expert output times its combine weight into its
token. Shape legend as in `xmoe.moe.dispatch`; N = T*K flattened assignments.
"""

from __future__ import annotations

import torch

from xmoe.moe.dispatch import Dispatched, Dispatcher, Routing


class ReferenceDispatcher(Dispatcher):
    """Per-expert loop dispatch/combine for expert parallelism 1."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, meanwhile=None) -> Dispatched:
        T, K = routing.topk_ids_TK.shape
        ids_N = routing.topk_ids_TK.reshape(-1)
        kept_N = torch.ones_like(ids_N, dtype=torch.bool)
        if routing.keep_TK is not None:
            kept_N = routing.keep_TK.reshape(-1)
        assign_idx = []
        counts_E = []
        for e in range(self.num_experts):
            n_idx = torch.nonzero((ids_N == e) & kept_N, as_tuple=False).reshape(-1)
            assign_idx.append(n_idx)
            counts_E.append(int(n_idx.numel()))
        n_R = torch.cat(assign_idx) if assign_idx else ids_N.new_zeros(0)
        token_R = torch.div(n_R, K, rounding_mode="floor")
        x_RD = x_TD[token_R]
        state = (n_R, token_R, routing.topk_weights_TK, T)
        return Dispatched(x_RD, counts_E, state, {"rows": float(x_RD.shape[0])})

    def combine(self, y_RD: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        n_R, token_R, weights_TK, T = dispatched.state
        w_R = weights_TK.reshape(-1)[n_R].to(y_RD.dtype)
        out_TD = y_RD.new_zeros(T, y_RD.shape[1])
        return out_TD.index_add(0, token_R, y_RD * w_R[:, None])
