"""The LM head and its cross-entropy in one pass over the vocabulary, a chunk of tokens at
a time, with the gradients computed in the forward pass.

  per chunk of rows:  logits = h @ Wᵀ                              [rows, V], h's dtype
                      loss_r = lse_r - logits[r, t_r]               (fp32 per row)
                      g      = (softmax(logits) - onehot(t)) * scale, written over logits
                      dh     = g @ W,   dW += gᵀ @ h
  backward:           dh, dW times the incoming gradient of the loss

The unfused head keeps its input for backward and, per token, the fp32 log-probabilities
(4·V bytes); in between it makes the bf16 logits, an fp32 copy of them and an fp32
gradient (about 10·V bytes per token at its peak: 4 GB at 8192 tokens and V = 50304).
This keeps dh (2·D bytes per token) and dW (one weight's size) and needs one chunk of
logits at a time. `ce_rows` (one Triton kernel: an online max/sum pass and a gradient
pass over each row) turns a chunk's logits into its losses and gradient in place; its
torch reference runs where Triton does not. dW is accumulated in the weight's dtype over
the chunks (a few roundings, as bf16 gradient accumulation over micro-batches does).
"""

from __future__ import annotations

import torch

from xmoe.kernels.backend import HAVE_TRITON, acc_dtype, kernel, use_triton

CHUNK_BYTES = 1 << 28  # logits of one chunk of rows: 256 MiB

if HAVE_TRITON:
    import triton.language as tl

    @kernel
    def _ce_rows_kernel(
        x_ptr,
        t_ptr,
        loss_ptr,
        V,
        stride,
        scale,
        ACC_FP64: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * stride
        acc_ty = tl.float64 if ACC_FP64 else tl.float32
        m = tl.full((), float("-inf"), acc_ty)
        s = tl.zeros((), acc_ty)
        for v0 in range(0, V, BLOCK_V):
            v = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(base + v, mask=v < V, other=float("-inf")).to(acc_ty)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        t = tl.load(t_ptr + row)
        tl.store(loss_ptr + row, lse - tl.load(base + t).to(acc_ty))
        for v0 in range(0, V, BLOCK_V):
            v = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(base + v, mask=v < V, other=0.0).to(acc_ty)
            g = (tl.exp(x - lse) - tl.where(v == t, 1.0, 0.0)) * scale
            tl.store(base + v, g.to(x_ptr.dtype.element_ty), mask=v < V)


def ce_rows_torch(
    logits_NV: torch.Tensor, targets_N: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: per-row loss (fp32, fp64 for fp64) and (softmax - onehot) * scale in
    logits' dtype (a new tensor)."""
    x = logits_NV.to(acc_dtype(logits_NV.dtype))
    lse = torch.logsumexp(x, dim=1)
    loss = lse - x.gather(1, targets_N[:, None]).squeeze(1)
    g = torch.exp(x - lse[:, None])
    g[torch.arange(g.shape[0], device=g.device), targets_N] -= 1.0
    return loss, (g * scale).to(logits_NV.dtype)


def ce_rows(
    logits_NV: torch.Tensor, targets_N: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy losses and their gradient times `scale`; the Triton kernel
    writes the gradient over `logits_NV` (contiguous rows) and returns it."""
    if not use_triton(logits_NV):
        return ce_rows_torch(logits_NV, targets_N, scale)
    N, V = logits_NV.shape
    loss = torch.empty(N, dtype=acc_dtype(logits_NV.dtype), device=logits_NV.device)
    if N:
        block, warps = ce_config(logits_NV.is_cuda)
        _ce_rows_kernel[(N,)](
            logits_NV,
            targets_N.contiguous(),
            loss,
            V,
            logits_NV.stride(0),
            scale,
            ACC_FP64=logits_NV.dtype == torch.float64,
            BLOCK_V=block,
            num_warps=warps,
        )
    return loss, logits_NV


def ce_config(gpu: bool) -> tuple[int, int]:
    """(BLOCK_V, warps): a row streams through in 4096-wide blocks on a GPU; the
    interpreter takes small blocks so that the tests cover several per row."""
    return (4096, 8) if gpu else (16, 1)


def chunk_rows(V: int, element_size: int) -> int:
    """Rows per chunk so that a chunk's logits take about `CHUNK_BYTES`."""
    return max(1, CHUNK_BYTES // max(1, V * element_size))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_TD, w_VD, targets_T, scale, rows):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(h_TD) if need_h else None
        dw = torch.zeros_like(w_VD) if need_w else None
        total = torch.zeros((), dtype=acc_dtype(h_TD.dtype), device=h_TD.device)
        for a in range(0, h_TD.shape[0], rows):
            h = h_TD[a : a + rows]
            loss, g = ce_rows(h @ w_VD.t(), targets_T[a : a + rows], scale)
            total += loss.sum()
            if need_h:
                torch.mm(g, w_VD, out=dh[a : a + rows])
            if need_w:
                dw.addmm_(g.t(), h)
        ctx.save_for_backward(dh, dw)
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        return (
            None if dh is None else dh * grad_loss.to(dh.dtype),
            None if dw is None else dw * grad_loss.to(dw.dtype),
            None,
            None,
            None,
        )


def linear_cross_entropy(
    h_TD: torch.Tensor,
    w_VD: torch.Tensor,
    targets_T: torch.Tensor,
    scale: float,
    rows: int | None = None,
) -> torch.Tensor:
    """scale * sum_t CE(h_t @ Wᵀ, target_t) without the [T, V] logits: `scale` = 1/T is
    the mean. Gradients flow to h_TD and w_VD (computed here, in the forward pass)."""
    if rows is None:
        rows = chunk_rows(w_VD.shape[0], h_TD.element_size())
    return _LinearCrossEntropy.apply(h_TD.contiguous(), w_VD, targets_T.contiguous(), scale, rows)
