"""The GShard / DeepSpeed-MoE dispatcher: capacity-padded [E, C, D] buffers and einsums.

Our in-tree baseline, the algorithm PFT is measured against. Every expert gets exactly C
slots. Each kept (token, k) assignment takes the next free slot of its expert (top-1
choices first, GShard's priority), dispatch is an einsum with a one-hot [T, E, C] mask and
combine an einsum with the same mask scaled by the combine weights. Empty slots are zero
rows that still travel and still go through the experts: that is the padding cost.

Dropping is decided by the router's keep mask, so C = ceil(T * k * cf / E) never drops
anything more; dropless uses C = the largest expert count (DeepSpeed's drop_tokens=False).
With EP > 1, C is the maximum over the EP group and the exchange is an equal-split
all-to-all of [W, El, C, D] blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from xmoe.config import Config, capacity
from xmoe.moe.dispatch import Dispatched, Dispatcher, Routing
from xmoe.parallel.collectives import all_to_all_uneven


@dataclass
class PaddedState:
    combine_TEC: torch.Tensor  # combine weight in each (expert, slot); zero where empty
    capacity: int


class PaddedDispatcher(Dispatcher):
    """Capacity-padded einsum dispatch and combine (dropless: pad to the largest expert)."""

    def __init__(self, cfg: Config, parallel_state: Any = None) -> None:
        super().__init__()
        self.moe = cfg.moe
        self.num_experts = cfg.moe.num_experts
        self.group = None if parallel_state is None else parallel_state.ep_group
        self.ep = 1 if parallel_state is None else parallel_state.ep

    def _slots(self, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Slot of each (token, k) inside its expert, k-major order; the capacity C."""
        T, K = routing.topk_ids_TK.shape
        E = self.num_experts
        mask_KTE = F.one_hot(routing.topk_ids_TK.t(), E)
        if routing.keep_TK is not None:
            mask_KTE = mask_KTE * routing.keep_TK.t()[..., None]
        slot_KTE = torch.cumsum(mask_KTE.reshape(K * T, E), 0).reshape(K, T, E) - 1
        slot_TK = (slot_KTE * mask_KTE).sum(-1).t()
        kept_TK = mask_KTE.sum(-1).t().bool()
        if self.moe.dropless:
            cap = mask_KTE.sum((0, 1)).max() if T else torch.zeros((), dtype=torch.long)
        else:
            cap = torch.tensor(capacity(T, self.moe) if T else 0)
        if self.ep > 1:
            cap = cap.reshape(1).to(routing.topk_ids_TK.device)
            dist.all_reduce(cap, op=dist.ReduceOp.MAX, group=self.group)
        return slot_TK, kept_TK, max(1, int(cap))  # the host sync

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, meanwhile=None) -> Dispatched:
        E, W = self.num_experts, self.ep
        El = E // W
        slot_TK, kept_TK, C = self._slots(routing)
        onehot_e_TKE = F.one_hot(routing.topk_ids_TK, E).to(x_TD.dtype)
        onehot_c_TKC = F.one_hot(slot_TK.clamp(0, C - 1), C).to(x_TD.dtype) * kept_TK[..., None]
        w_TK = routing.topk_weights_TK.to(x_TD.dtype)
        combine_TEC = torch.einsum("tk,tke,tkc->tec", w_TK, onehot_e_TKE, onehot_c_TKC)
        dispatch_TEC = torch.einsum("tke,tkc->tec", onehot_e_TKE, onehot_c_TKC)
        x_ECD = torch.einsum("tec,td->ecd", dispatch_TEC, x_TD)
        if W > 1:
            # [W, El, C, D] by destination -> [W, El, C, D] by source -> [El, W, C, D]
            x_ECD = all_to_all_uneven(
                x_ECD.reshape(E * C, -1), [El * C] * W, [El * C] * W, self.group
            )
            x_ECD = x_ECD.reshape(W, El, C, -1).transpose(0, 1)
        x_RD = x_ECD.reshape(El * W * C, -1)
        stats = {"rows": float(x_RD.shape[0]), "capacity": float(C)}
        return Dispatched(x_RD, [W * C] * El, PaddedState(combine_TEC, C), stats)

    def combine(self, y_RD: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        st: PaddedState = dispatched.state
        E, W, C = self.num_experts, self.ep, st.capacity
        El = E // W
        y_ECD = y_RD.reshape(El, W, C, -1)
        if W > 1:
            y_ECD = y_ECD.transpose(0, 1).reshape(E * C, -1)
            y_ECD = all_to_all_uneven(y_ECD, [El * C] * W, [El * C] * W, self.group)
        y_ECD = y_ECD.reshape(E, C, -1)
        return torch.einsum("tec,ecd->td", st.combine_TEC.to(y_ECD.dtype), y_ECD)
