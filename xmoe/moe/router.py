"""Top-k router: fp32 gate, load-balancing losses, expert bias and the capacity drop policy.

The router decides everything about a token's experts once — ids, combine weights and
which assignments capacity drops — so every dispatcher sees the same `Routing` and can be
compared exactly against the reference. Shape legend as in `xmoe.moe.dispatch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xmoe.config import MoEConfig, capacity
from xmoe.kernels.router_topk import softmax_topk, topk_outputs
from xmoe.kernels.routing import count_ids
from xmoe.moe.dispatch import Routing
from xmoe.moe.rbd_plan import node_limited_topk


@dataclass
class RouterOutput:
    """The routing decision plus what the loss and the metrics need."""

    routing: Routing
    aux_loss: torch.Tensor  # Switch/GShard load-balancing loss (unscaled, fp32 scalar)
    z_loss: torch.Tensor  # mean squared log-partition of the logits (unscaled)
    tokens_per_expert_E: torch.Tensor  # int64 routed assignments per expert, before dropping
    # share of (token, k) assignments removed by capacity: a 0-dim fp64 tensor on the
    # router's device, read on the host only when logged (no host sync in the step)
    dropped_fraction: torch.Tensor


class _Fp32Logits(torch.autograd.Function):
    """logits_TE = x_TD @ w_ED.T computed in fp32, saving x and w as they are (no fp32 copy
    of the activations kept for backward).

    For bf16/fp16 operands on a GPU the matmuls run in TF32: a bf16 or fp16 value is exact
    in TF32, so every product is exact and only the fp32 accumulation order differs from
    an IEEE fp32 GEMM, at a fraction of its cost (fp32 GEMMs are not tensor-core work).
    In backward the fp32 gradient is rounded to TF32 (10 mantissa bits) before the
    matmuls. fp32/fp64 operands (the CPU tests) take the plain fp32 path.
    """

    @staticmethod
    def _tf32(x: torch.Tensor) -> bool:
        return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)

    @staticmethod
    def _matmul(a: torch.Tensor, b: torch.Tensor, tf32: bool) -> torch.Tensor:
        if not tf32:
            return a @ b
        flag = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return a @ b
        finally:
            torch.backends.cuda.matmul.allow_tf32 = flag

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_TD, w_ED)
        return _Fp32Logits._matmul(x_TD.float(), w_ED.float().t(), _Fp32Logits._tf32(x_TD))

    @staticmethod
    def backward(ctx, g_TE: torch.Tensor):
        x_TD, w_ED = ctx.saved_tensors
        tf32 = _Fp32Logits._tf32(x_TD)
        g_TE = g_TE.float()
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = _Fp32Logits._matmul(g_TE, w_ED.float(), tf32).to(x_TD.dtype)
        if ctx.needs_input_grad[1]:
            gw = _Fp32Logits._matmul(g_TE.t(), x_TD.float(), tf32).to(w_ED.dtype)
        return gx, gw


def router_logits(x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
    """The router's fp32 logits (see `_Fp32Logits`)."""
    return _Fp32Logits.apply(x_TD, w_ED)


def capacity_keep_mask(
    topk_ids_TK: torch.Tensor, topk_probs_TK: torch.Tensor, num_experts: int, capacity: int
) -> torch.Tensor:
    """Keep the first `capacity` assignments of every expert, ranked by router probability.

    Within one expert, assignments are ordered by probability (descending); equal
    probabilities fall back to token index, then k. Ranks are exact integers (two stable
    sorts and a subtraction), never a floating-point cumsum, so the policy holds at any T.
    """
    ids_N = topk_ids_TK.reshape(-1)
    probs_N = topk_probs_TK.detach().reshape(-1)
    n = ids_N.numel()
    # flat index n = t*K + k already is the (token, k) tie-break order; stable sorts keep it.
    by_prob_N = torch.sort(probs_N, descending=True, stable=True).indices
    by_expert = torch.sort(ids_N[by_prob_N], stable=True).indices
    order_N = by_prob_N[by_expert]
    counts_E = count_ids(ids_N, num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    sorted_ids_N = ids_N[order_N]
    rank_sorted_N = torch.arange(n, device=ids_N.device) - starts_E[sorted_ids_N]
    rank_N = torch.empty_like(rank_sorted_N)
    rank_N[order_N] = rank_sorted_N
    return (rank_N < capacity).reshape(topk_ids_TK.shape)


class Router(nn.Module):
    """Chooses top-k experts per token from fp32 softmax probabilities.

    With `cfg.expert_bias` a per-expert bias (a buffer, not trained) is added to the
    probabilities for *selection only*, DeepSeek-V3 style; the combine weights stay the
    unbiased probabilities. The bias moves with `update_expert_bias` from the load
    accumulated since the last update.
    """

    def __init__(self, cfg: MoEConfig, hidden: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.weight_ED = nn.Parameter(torch.empty(cfg.num_experts, hidden))
        nn.init.normal_(self.weight_ED, std=init_std)
        # An integer buffer on purpose: engines cast float buffers to bf16, which would round
        # the bias; keeping the net number of +-1 updates (times the rate) stays exact.
        self.register_buffer("bias_steps_E", torch.zeros(cfg.num_experts, dtype=torch.long))
        # Node-limited routing (cfg.max_nodes_per_token) needs the EP layout: experts per
        # node, set by the MoE layer from the parallel state; 0 leaves it off.
        self.experts_per_node = 0

    @property
    def expert_bias_E(self) -> torch.Tensor:
        return self.bias_steps_E.float() * self.cfg.expert_bias_rate

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        cfg = self.cfg
        T = x_TD.shape[0]
        logits_TE = router_logits(x_TD, self.weight_ED)
        node_limited = bool(cfg.max_nodes_per_token and self.experts_per_node)
        if not (node_limited or cfg.expert_bias):
            # plain top-k: softmax, selection, renormalisation and the balance losses' sums
            # in one kernel each way on a GPU (`xmoe.kernels.router_topk`)
            fused = softmax_topk(logits_TE, self.top_k, cfg.renormalize)
            topk_ids_TK, topk_probs_TK, weights_TK = fused[:3]
            probs_sum_E, lse_sq_sum, tokens_per_expert_E = fused[3:]
        else:
            probs_TE = torch.softmax(logits_TE, dim=-1)
            select_TE = probs_TE.detach()
            if cfg.expert_bias:
                select_TE = select_TE + self.expert_bias_E
            if node_limited:
                topk_ids_TK = node_limited_topk(
                    select_TE, self.top_k, cfg.max_nodes_per_token, self.experts_per_node
                )
            else:
                topk_ids_TK = torch.topk(select_TE, self.top_k, dim=-1).indices
            topk_probs_TK, weights_TK, probs_sum_E, lse_sq_sum, tokens_per_expert_E = topk_outputs(
                logits_TE, probs_TE, topk_ids_TK, cfg.renormalize
            )

        keep_TK = None
        dropped = torch.zeros((), dtype=torch.float64, device=x_TD.device)
        if not cfg.dropless and T > 0:
            keep_TK = capacity_keep_mask(
                topk_ids_TK, topk_probs_TK, self.num_experts, capacity(T, cfg)
            )
            dropped = (~keep_TK).sum().double() / keep_TK.numel()

        aux_loss, z_loss = self._losses(probs_sum_E, lse_sq_sum, tokens_per_expert_E, T)
        routing = Routing(
            topk_ids_TK=topk_ids_TK,
            topk_weights_TK=weights_TK.to(x_TD.dtype),
            keep_TK=keep_TK,
            num_experts=self.num_experts,
        )
        return RouterOutput(routing, aux_loss, z_loss, tokens_per_expert_E, dropped)

    def reduce_load(self, load_E: torch.Tensor, tokens: int) -> tuple[torch.Tensor, int]:
        """The routed load and token count the balance losses are normalised by.

        They are those of every router whose losses are added to this one's: this router
        alone here (both returned as given). Each router's losses are the share of its own
        tokens, so the shares add up to the loss over all of them. A subclass that routes
        with others (`xmoe.moe.ssmb.TPRouter`) returns their sums; every rank of such a
        group calls it, even with no tokens, so it may hold a collective.
        """
        return load_E, tokens

    def _losses(
        self,
        probs_sum_E: torch.Tensor,
        lse_sq_sum: torch.Tensor,
        tokens_per_expert_E: torch.Tensor,
        T: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Balance losses from this router's sums over its tokens: the router
        probabilities per expert and the squared logsumexp of each token's logits."""
        load_E, total = self.reduce_load(tokens_per_expert_E, T)
        if total == 0:
            zero = probs_sum_E.sum() * 0.0
            return zero, zero
        # Switch Transformer: E * sum_e f_e * P_e, f_e = share of assignments routed to e
        # (not differentiable), P_e = mean router probability of e; 1.0 when balanced.
        # Here P_e sums only this router's tokens: its share of the mean over `total`.
        f_E = load_E.float() / (total * self.top_k)
        aux = self.num_experts * torch.sum(f_E * (probs_sum_E / total))
        # ST-MoE router z-loss keeps logits small, which keeps the fp32 softmax well scaled.
        z = lse_sq_sum / total
        return aux, z

    @torch.no_grad()
    def update_expert_bias(self, load_E: torch.Tensor) -> None:
        """DeepSeek-V3 update: raise the bias of under-loaded experts, lower over-loaded ones.

        `load_E` is the routed load since the last update (the training loop sums
        `tokens_per_expert_E` over micro-batches and ranks, so every replica moves alike).
        Kept out of `forward` so activation recomputation cannot count a batch twice.
        """
        if not self.cfg.expert_bias:
            return
        load = load_E.to(self.bias_steps_E.device).double()
        # no load at all moves nothing (mean - load = 0): no host-side check needed
        self.bias_steps_E += torch.sign(load.mean() - load).long()
