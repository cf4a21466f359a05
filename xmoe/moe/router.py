"""Top-k router: fp32 gate, load-balancing losses, expert bias and the capacity drop policy.

The router decides everything about a token's experts once — ids, combine weights and
which assignments capacity drops — so every dispatcher sees the same `Routing` and can be
compared exactly against the reference. Shape legend as in `xmoe.moe.dispatch`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from xmoe.config import MoEConfig, capacity
from xmoe.kernels.router_topk import TopK, softmax_topk, topk_outputs
from xmoe.kernels.routing import count_ids
from xmoe.moe.dispatch import Routing
from xmoe.moe.rbd_plan import node_limited_topk


class RouterOutput:
    """The routing decision plus what the loss and the metrics need.

    The losses, the load and the dropped share are made on first use, not in
    `Router.forward`: the layer reads them after its dispatch, so the host queues the
    experts' first GEMM several operations sooner (the GPU waits for the host at the
    start of a layer, each operation about 5-100 us of the host's time)."""

    def __init__(
        self, routing: Routing, top: TopK, losses: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        self.routing = routing
        self._top = top
        self._losses = losses

    @property
    def tokens_per_expert_E(self) -> torch.Tensor:
        """int64 routed assignments per expert, before dropping."""
        return self._top.counts_E

    @functools.cached_property
    def _loss_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._losses()

    @property
    def aux_loss(self) -> torch.Tensor:
        """Switch/GShard load-balancing loss (unscaled, fp32 scalar)."""
        return self._loss_pair[0]

    @property
    def z_loss(self) -> torch.Tensor:
        """Mean squared log-partition of the logits (unscaled)."""
        return self._loss_pair[1]

    @functools.cached_property
    def dropped_fraction(self) -> torch.Tensor:
        """Share of (token, k) assignments removed by capacity: a 0-dim fp64 tensor on
        the router's device, read on the host only when logged (no host sync in the step)."""
        keep_TK = self.routing.keep_TK
        if keep_TK is None:
            return torch.zeros((), dtype=torch.float64, device=self.routing.topk_ids_TK.device)
        return (~keep_TK).sum().double() / keep_TK.numel()


# aten's `mm` with an fp32 result from bf16 operands (fp32 accumulation), where this
# torch has it: the router then never copies its input to fp32
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def _mm_fp32_acc(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b of bf16 operands with fp32 accumulation, the result in `out_dtype`. Off the
    GPU (the tests) the same products and sums in fp32, then rounded."""
    if a.is_cuda:
        return a @ b if out_dtype == a.dtype else torch.mm(a, b, out_dtype=out_dtype)
    return (a.float() @ b.float()).to(out_dtype)


def split_bf16(g: torch.Tensor) -> torch.Tensor:
    """fp32 [T, E] as two bf16 halves side by side, [T, 2E] = [hi | lo], hi + lo = g to
    about 16 significant bits: g @ w == [hi | lo] @ [w ; w] in one bf16 GEMM."""
    hi = g.to(torch.bfloat16)
    return torch.cat([hi, (g - hi.float()).to(torch.bfloat16)], dim=1)


def logits_bf16_grads(
    g_TE: torch.Tensor, x_TD: torch.Tensor, w_ED: torch.Tensor, need_x: bool, need_w: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of x_TD @ w_ED.T (bf16 operands) from the fp32 gradient of the
    logits, without an fp32 copy of x: the gradient split in two bf16 halves
    (`split_bf16`), bf16 GEMMs accumulating in fp32."""
    g2 = split_bf16(g_TE.float())
    gx = gw = None
    if need_x:
        gx = _mm_fp32_acc(g2, torch.cat([w_ED, w_ED]), torch.bfloat16)
    if need_w:
        E = w_ED.shape[0]
        gw2 = _mm_fp32_acc(g2.t(), x_TD, torch.float32)
        gw = (gw2[:E] + gw2[E:]).to(w_ED.dtype)
    return gx, gw


class _Fp32Logits(torch.autograd.Function):
    """logits_TE = x_TD @ w_ED.T computed in fp32, saving x and w as they are (no fp32 copy
    of the activations kept for backward).

    bf16 operands on a GPU: bf16 GEMMs with fp32 accumulation and an fp32 result, every
    product exact (as an fp32 GEMM of the same values gives, up to the order of the
    sums), and no fp32 copy of x even for a moment. Backward splits the fp32 gradient in
    two bf16 halves (about 16 significant bits, more than TF32's 11; `logits_bf16_grads`).
    fp16 operands on a GPU run the fp32 matmuls in TF32 (an fp16 value is exact in TF32;
    in backward the gradient is rounded to TF32). fp32/fp64 operands (the CPU tests) take
    the plain fp32 path.
    """

    @staticmethod
    def _bf16(x: torch.Tensor, w: torch.Tensor) -> bool:
        return x.is_cuda and x.dtype == w.dtype == torch.bfloat16 and _MM_OUT_DTYPE

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
        if _Fp32Logits._bf16(x_TD, w_ED):
            return _mm_fp32_acc(x_TD, w_ED.t(), torch.float32)
        return _Fp32Logits._matmul(x_TD.float(), w_ED.float().t(), _Fp32Logits._tf32(x_TD))

    @staticmethod
    def backward(ctx, g_TE: torch.Tensor):
        x_TD, w_ED = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        if _Fp32Logits._bf16(x_TD, w_ED):
            return logits_bf16_grads(g_TE, x_TD, w_ED, need_x, need_w)
        tf32 = _Fp32Logits._tf32(x_TD)
        g_TE = g_TE.float()
        gx = gw = None
        if need_x:
            gx = _Fp32Logits._matmul(g_TE, w_ED.float(), tf32).to(x_TD.dtype)
        if need_w:
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
            top = softmax_topk(logits_TE, self.top_k, cfg.renormalize, x_TD.dtype)
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
            top = topk_outputs(logits_TE, probs_TE, topk_ids_TK, cfg.renormalize, x_TD.dtype)

        keep_TK = None
        if not cfg.dropless and T > 0:
            keep_TK = capacity_keep_mask(
                top.ids_TK, top.topk_probs_TK, self.num_experts, capacity(T, cfg)
            )
        routing = Routing(
            topk_ids_TK=top.ids_TK,
            topk_weights_TK=top.weights_TK,
            keep_TK=keep_TK,
            num_experts=self.num_experts,
            count_routed=lambda: top.counts_E,
        )
        losses = functools.partial(self._losses, top, T)
        return RouterOutput(routing, top, losses)

    def reduce_load(self, load_E: torch.Tensor, tokens: int) -> tuple[torch.Tensor, int]:
        """The routed load and token count the balance losses are normalised by.

        They are those of every router whose losses are added to this one's: this router
        alone here (both returned as given). Each router's losses are the share of its own
        tokens, so the shares add up to the loss over all of them. A subclass that routes
        with others (`xmoe.moe.ssmb.TPRouter`) returns their sums; every rank of such a
        group calls it, even with no tokens, so it may hold a collective.
        """
        return load_E, tokens

    def _losses(self, top: TopK, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Balance losses from this router's sums over its tokens: the router
        probabilities per expert and the squared logsumexp of each token's logits."""
        probs_sum_E, lse_sq_sum = top.probs_sum_E, top.lse_sq_sum
        load_E, total = self.reduce_load(top.counts_E, T)
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
