"""The router's softmax, top-k and balance-loss sums in one kernel each way.

From fp32 logits [T, E] (E <= 1024), per token:
  probs = softmax(logits), lse = logsumexp(logits)
  the k largest probabilities, largest first, and their experts (ties: the lower expert)
  weights = those probabilities, renormalised to sum to one if asked
and over the tokens (per-program partial sums, added in a fixed order: deterministic):
  probs_sum_E   sum of probs per expert      (the aux loss's P_e, times T)
  lse_sq_sum    sum of lse^2                 (the z-loss, times T)
  counts_E      assignments per expert       (the aux loss's f_e, times T k)
The partial sums are added on first use (`TopK`): the router reads them after the
dispatch, so the step's first expert GEMM is not queued behind three reductions.
The unfused router ran about 25 small kernels for this each way (softmax, top-k, the
renormalisation, bincount, the two loss sums), each launched by the host after the last
had finished. Backward takes the gradients of weights and of the partial sums of probs and lse^2 (each
token reads its program's row) and gives the logits' gradient, recomputing probs from
the saved logits and lse:
  d probs = scatter(d selected probs) + d probs_sum_E
  d logits = probs * (d probs - <probs, d probs>) + 2 lse probs d lse_sq_sum
The torch reference below computes the same with plain ops (autograd) where Triton does
not run (`backend.use_triton`).
"""

from __future__ import annotations

import functools

import torch

from xmoe.kernels.backend import HAVE_TRITON, kernel, next_pow2, split_rows, use_triton
from xmoe.kernels.routing import count_ids

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @kernel
    def _softmax_topk_fwd_kernel(
        logits_ptr,
        lse_ptr,
        ids_ptr,
        topp_ptr,
        w_ptr,
        wo_ptr,
        psum_ptr,
        zsq_ptr,
        cnt_ptr,
        T,
        E,
        rows_per_prog,
        K: tl.constexpr,
        RENORM: tl.constexpr,
        BLOCK_T: tl.constexpr,
        E_PAD: tl.constexpr,
    ):
        p_id = tl.program_id(0)
        e = tl.arange(0, E_PAD)
        me = e < E
        psum = tl.zeros((E_PAD,), dtype=tl.float32)
        cnt = tl.zeros((E_PAD,), dtype=tl.int32)
        zsq = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for r0 in range(0, rows_per_prog, BLOCK_T):
            t = p_id.to(tl.int64) * rows_per_prog + r0 + tl.arange(0, BLOCK_T)
            mt = (t < T) & (r0 + tl.arange(0, BLOCK_T) < rows_per_prog)
            m2 = mt[:, None] & me[None, :]
            lg = tl.load(logits_ptr + t[:, None] * E + e[None, :], mask=m2, other=-float("inf"))
            mx = tl.max(lg, axis=1)
            mx = tl.where(mt, mx, 0.0)
            ex = tl.exp(lg - mx[:, None])
            ex = tl.where(m2, ex, 0.0)
            s = tl.sum(ex, axis=1)
            s = tl.where(mt, s, 1.0)
            p = ex / s[:, None]
            lse = mx + tl.log(s)
            tl.store(lse_ptr + t, lse, mask=mt)
            psum += tl.sum(p, axis=0)
            zsq += tl.where(mt, lse * lse, 0.0)
            # top-k by repeated arg-max; taken experts drop to -1 (probabilities are >= 0).
            # With renormalisation a first pass only sums the k values (registers cannot
            # hold a list of them), the second stores them.
            total = tl.full((BLOCK_T,), 1.0, dtype=tl.float32)
            if RENORM:
                total = tl.zeros((BLOCK_T,), dtype=tl.float32)
                left = tl.where(m2, p, -1.0)
                for _k in tl.static_range(K):
                    v = tl.max(left, axis=1)
                    idx = tl.min(tl.where(left == v[:, None], e[None, :], E_PAD), axis=1)
                    total += v
                    left = tl.where(e[None, :] == idx[:, None], -1.0, left)
                total = tl.maximum(total, 1e-20)
            left = tl.where(m2, p, -1.0)
            for k in tl.static_range(K):
                v = tl.max(left, axis=1)
                idx = tl.min(tl.where(left == v[:, None], e[None, :], E_PAD), axis=1)
                tl.store(ids_ptr + t * K + k, idx.to(tl.int64), mask=mt)
                tl.store(topp_ptr + t * K + k, v, mask=mt)
                tl.store(w_ptr + t * K + k, v / total, mask=mt)
                tl.store(wo_ptr + t * K + k, (v / total).to(wo_ptr.dtype.element_ty), mask=mt)
                hit = e[None, :] == idx[:, None]
                cnt += tl.sum((hit & mt[:, None]).to(tl.int32), axis=0)
                left = tl.where(hit, -1.0, left)
        tl.store(psum_ptr + p_id * E + e, psum, mask=me)
        tl.store(cnt_ptr + p_id * E + e, cnt, mask=me)
        tl.store(zsq_ptr + p_id, tl.sum(zsq, axis=0))

    @kernel
    def _softmax_topk_bwd_kernel(
        logits_ptr,
        lse_ptr,
        ids_ptr,
        w_ptr,
        gw_ptr,
        gpsum_ptr,
        gzsq_ptr,
        dlogits_ptr,
        T,
        E,
        rows_per_prog,
        s_gpsum,
        s_gzsq,
        K: tl.constexpr,
        RENORM: tl.constexpr,
        HAS_GPSUM: tl.constexpr,
        HAS_GZSQ: tl.constexpr,
        BLOCK_T: tl.constexpr,
        E_PAD: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        mt = t < T
        e = tl.arange(0, E_PAD)
        me = e < E
        m2 = mt[:, None] & me[None, :]
        lg = tl.load(logits_ptr + t[:, None] * E + e[None, :], mask=m2, other=0.0)
        lse = tl.load(lse_ptr + t, mask=mt, other=0.0)
        p = tl.where(m2, tl.exp(lg - lse[:, None]), 0.0)
        # the selected probabilities' gradient, through the renormalisation
        dot = tl.zeros((BLOCK_T,), dtype=tl.float32)
        total = tl.zeros((BLOCK_T,), dtype=tl.float32)
        if RENORM:
            for k in tl.static_range(K):
                gw = tl.load(gw_ptr + t * K + k, mask=mt, other=0.0)
                w = tl.load(w_ptr + t * K + k, mask=mt, other=0.0)
                idx = tl.load(ids_ptr + t * K + k, mask=mt, other=0)
                dot += gw * w
                total += tl.sum(tl.where(e[None, :] == idx[:, None], p, 0.0), axis=1)
            total = tl.maximum(total, 1e-20)
        # the forward program that summed this token's probs (its row of the partials)
        prog = t // rows_per_prog
        dp = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
        if HAS_GPSUM:
            dp += tl.load(gpsum_ptr + prog[:, None] * s_gpsum + e[None, :], mask=m2, other=0.0)
        for k in tl.static_range(K):
            gw = tl.load(gw_ptr + t * K + k, mask=mt, other=0.0)
            idx = tl.load(ids_ptr + t * K + k, mask=mt, other=0)
            if RENORM:
                gw = (gw - dot) / total
            dp += tl.where(e[None, :] == idx[:, None], gw[:, None], 0.0)
        inner = tl.sum(p * dp, axis=1)
        dl = p * (dp - inner[:, None])
        if HAS_GZSQ:
            gz = tl.load(gzsq_ptr + prog * s_gzsq, mask=mt, other=0.0)
            dl += (2.0 * gz * lse)[:, None] * p
        tl.store(dlogits_ptr + t[:, None] * E + e[None, :], dl, mask=m2)


class TopK:
    """The router's choice for each token and its sums over the tokens (`softmax_topk`,
    `topk_outputs`): ids, selected probabilities (no gradient) and combine weights per
    (token, k), and the sums kept as rows of partial sums ([P, E] and [P]; P = 1 from
    the plain ops), added on first read in a fixed order."""

    def __init__(self, ids_TK, topk_probs_TK, weights_TK, probs_sum_PE, lse_sq_P, counts_PE):
        self.ids_TK, self.topk_probs_TK, self.weights_TK = ids_TK, topk_probs_TK, weights_TK
        self._parts = (probs_sum_PE, lse_sq_P, counts_PE)

    @functools.cached_property
    def probs_sum_E(self) -> torch.Tensor:
        """fp32 sum of each expert's probability over the tokens (differentiable)."""
        return self._parts[0].sum(0)

    @functools.cached_property
    def lse_sq_sum(self) -> torch.Tensor:
        """fp32 sum of the squared logsumexp of the tokens' logits (differentiable)."""
        return self._parts[1].sum()

    @functools.cached_property
    def counts_E(self) -> torch.Tensor:
        """int64 assignments per expert."""
        return self._parts[2].sum(0, dtype=torch.int64)


def topk_outputs(
    logits_TE: torch.Tensor,
    probs_TE: torch.Tensor,
    ids_TK: torch.Tensor,
    renormalize: bool,
    weights_dtype: torch.dtype = torch.float32,
) -> TopK:
    """What the router returns for the experts `ids_TK` it chose from `probs_TE`, from
    plain ops, differentiable in the logits through the weights (in `weights_dtype`) and
    the sums. Also the router's own path where selection is not plain top-k (expert
    bias, node limits), so it runs on GPUs too (not a `*_torch` reference: the host-sync
    test counts it)."""
    topk_probs_TK = probs_TE.gather(1, ids_TK)
    weights_TK = topk_probs_TK
    if renormalize:
        weights_TK = topk_probs_TK / topk_probs_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    counts_E = count_ids(ids_TK, logits_TE.shape[1])
    lse_sq = torch.logsumexp(logits_TE, dim=-1).square().sum()
    return TopK(
        ids_TK, topk_probs_TK.detach(), weights_TK.to(weights_dtype),
        probs_TE.sum(0, keepdim=True), lse_sq.reshape(1), counts_E[None],
    )  # fmt: skip


def softmax_topk_torch(
    logits_TE: torch.Tensor, k: int, renormalize: bool, weights_dtype: torch.dtype = torch.float32
) -> TopK:
    """Reference: `softmax_topk` from plain ops (autograd)."""
    probs_TE = torch.softmax(logits_TE, dim=-1)
    ids_TK = torch.topk(probs_TE, k, dim=-1).indices
    return topk_outputs(logits_TE, probs_TE, ids_TK, renormalize, weights_dtype)


def _blocks(E: int) -> tuple[int, int]:
    """(E_PAD, BLOCK_T): every expert's logit of a token in one block, up to 4096 values
    (and 64 tokens) a block."""
    e_pad = max(2, next_pow2(E))
    return e_pad, max(1, min(64, 4096 // e_pad))


class _SoftmaxTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, k, renormalize, weights_dtype):
        T, E = logits_TE.shape
        dev = logits_TE.device
        e_pad, block_t = _blocks(E)
        progs, rows = split_rows(T, dev, block_t)
        lse = torch.empty(T, dtype=torch.float32, device=dev)
        ids = torch.empty(T, k, dtype=torch.int64, device=dev)
        topp = torch.empty(T, k, dtype=torch.float32, device=dev)
        w = torch.empty(T, k, dtype=torch.float32, device=dev)  # fp32, for backward
        wo = w if weights_dtype == torch.float32 else torch.empty_like(w, dtype=weights_dtype)
        psum = torch.empty(progs, E, dtype=torch.float32, device=dev)
        cnt = torch.empty(progs, E, dtype=torch.int32, device=dev)
        zsq = torch.empty(progs, dtype=torch.float32, device=dev)
        _softmax_topk_fwd_kernel[(progs,)](
            logits_TE, lse, ids, topp, w, wo, psum, zsq, cnt, T, E, rows,
            K=k, RENORM=renormalize, BLOCK_T=block_t, E_PAD=e_pad,
        )  # fmt: skip
        ctx.save_for_backward(logits_TE, lse, ids, w)
        ctx.renormalize, ctx.rows = renormalize, rows
        ctx.set_materialize_grads(False)  # unused outputs' gradients stay None: no zero fills
        ctx.mark_non_differentiable(ids, topp, cnt)
        return ids, topp, wo, psum, zsq, cnt

    @staticmethod
    def backward(ctx, _g_ids, _g_topp, g_w, g_psum_PE, g_zsq_P, _g_cnt):
        logits_TE, lse, ids, w = ctx.saved_tensors
        T, E = logits_TE.shape
        k = ids.shape[1]
        g_w = torch.zeros_like(w) if g_w is None else g_w.float().contiguous()
        # (the partials' gradients arrive as the sums' gradient broadcast: stride 0 rows)
        g_psum = w if g_psum_PE is None else g_psum_PE.float()
        if g_psum.stride(1) != 1:
            g_psum = g_psum.contiguous()
        g_zsq = w[:, 0] if g_zsq_P is None else g_zsq_P.float()
        dlogits = torch.empty_like(logits_TE)
        e_pad, block_t = _blocks(E)
        _softmax_topk_bwd_kernel[(triton.cdiv(T, block_t),)](
            logits_TE, lse, ids, w, g_w, g_psum, g_zsq, dlogits, T, E, ctx.rows,
            g_psum.stride(0), g_zsq.stride(0),
            K=k, RENORM=ctx.renormalize, HAS_GPSUM=g_psum_PE is not None,
            HAS_GZSQ=g_zsq_P is not None, BLOCK_T=block_t, E_PAD=e_pad,
        )  # fmt: skip
        return dlogits, None, None, None


def softmax_topk(
    logits_TE: torch.Tensor, k: int, renormalize: bool, weights_dtype: torch.dtype = torch.float32
) -> TopK:
    """The top-k choice of fp32 logits and the sums over the tokens (see the module doc),
    the combine weights in `weights_dtype`."""
    if logits_TE.dtype != torch.float32:
        raise ValueError(f"softmax_topk: logits must be fp32, got {logits_TE.dtype}")
    T, E = logits_TE.shape
    if not use_triton(logits_TE) or T == 0 or E > 1024:
        return softmax_topk_torch(logits_TE, k, renormalize, weights_dtype)
    ids, topp, w, psum, zsq, cnt = _SoftmaxTopK.apply(
        logits_TE.contiguous(), k, renormalize, weights_dtype
    )
    return TopK(ids, topp, w, psum, zsq, cnt)
