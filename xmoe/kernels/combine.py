"""Weighted unpermute-combine: y_TD[t] = sum_k w_TK[t, k] * out_RD[dest_row_TK[t, k]].

Forward is `permute.unpermute` with weights. Backward gives both gradients the router
needs: the expert outputs' (grad_y of the token, scaled by its weight, copied to its rows)
and the combine weights' (row-wise dot of grad_y with the expert output row, `row_dot`).
Dropped assignments (dest_row = -1) contribute nothing and get a zero weight gradient.
"""

from __future__ import annotations

import torch

from xmoe.kernels.backend import HAVE_TRITON, acc_dtype, kernel, next_pow2, use_triton
from xmoe.kernels.permute import scatter_rows, unpermute

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @kernel(rows=("N",))
    def _row_dot_kernel(
        a_ptr,
        rows_ptr,
        dest_ptr,
        out_ptr,
        N,
        D,
        K,
        s_a,
        s_rows,
        ACC_FP64: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mn = n < N
        idx = tl.load(dest_ptr + n, mask=mn, other=-1)
        valid = mn & (idx >= 0)
        tok = (n // K).to(tl.int64)
        acc_ty = tl.float64 if ACC_FP64 else tl.float32
        acc = tl.zeros((BLOCK_N,), dtype=acc_ty)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            md = d < D
            a = tl.load(
                a_ptr + tok[:, None] * s_a + d[None, :],
                mask=valid[:, None] & md[None, :],
                other=0.0,
            ).to(acc_ty)
            b = tl.load(
                rows_ptr + idx[:, None] * s_rows + d[None, :],
                mask=valid[:, None] & md[None, :],
                other=0.0,
            ).to(acc_ty)
            acc += tl.sum(a * b, axis=1)
        tl.store(out_ptr + n, acc, mask=mn)


def row_dot_torch(
    a_TD: torch.Tensor, rows_RD: torch.Tensor, dest_row_TK: torch.Tensor
) -> torch.Tensor:
    T, K = dest_row_TK.shape
    dest_N = dest_row_TK.reshape(-1)
    slot_M = (dest_N >= 0).nonzero().squeeze(1)
    acc = acc_dtype(a_TD.dtype)
    dots_M = (
        a_TD.index_select(0, slot_M // K).to(acc) * rows_RD.index_select(0, dest_N[slot_M]).to(acc)
    ).sum(1)
    out_N = torch.zeros(T * K, dtype=acc, device=a_TD.device)
    out_N[slot_M] = dots_M
    return out_N.view(T, K)


def row_dot(a_TD: torch.Tensor, rows_RD: torch.Tensor, dest_row_TK: torch.Tensor) -> torch.Tensor:
    """out_TK[t, k] = <a_TD[t], rows_RD[dest_row_TK[t, k]]> in `acc_dtype` (0 where dropped)."""
    if not use_triton(a_TD):
        return row_dot_torch(a_TD, rows_RD, dest_row_TK)
    a_TD, rows_RD = a_TD.contiguous(), rows_RD.contiguous()
    T, K = dest_row_TK.shape
    D = a_TD.shape[1]
    out_TK = torch.zeros(T, K, dtype=acc_dtype(a_TD.dtype), device=a_TD.device)
    if T * K == 0:
        return out_TK
    block_d = min(128, max(16, next_pow2(D)))
    block_n = max(1, 4096 // block_d)
    _row_dot_kernel[(triton.cdiv(T * K, block_n),)](
        a_TD,
        rows_RD,
        dest_row_TK.contiguous(),
        out_TK,
        T * K,
        D,
        K,
        a_TD.stride(0),
        rows_RD.stride(0),
        ACC_FP64=out_TK.dtype == torch.float64,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )
    return out_TK


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out_RD, w_TK, dest_row_TK):
        ctx.save_for_backward(out_RD, w_TK, dest_row_TK)
        return unpermute(out_RD, dest_row_TK, w_TK)

    @staticmethod
    def backward(ctx, grad_TD):
        out_RD, w_TK, dest_row_TK = ctx.saved_tensors
        grad_TD = grad_TD.contiguous()
        grad_out = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_out = scatter_rows(grad_TD, dest_row_TK, out_RD.shape[0], w_TK)
            grad_out = grad_out.to(out_RD.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = row_dot(grad_TD, out_RD, dest_row_TK).to(w_TK.dtype)
        return grad_out, grad_w, None


class _Sum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out_RD, dest_row_TK):
        ctx.save_for_backward(dest_row_TK)
        ctx.rows = out_RD.shape[0]
        return unpermute(out_RD, dest_row_TK)

    @staticmethod
    def backward(ctx, grad_TD):
        (dest_row_TK,) = ctx.saved_tensors
        return scatter_rows(grad_TD.contiguous(), dest_row_TK, ctx.rows), None


def combine(
    out_RD: torch.Tensor, w_TK: torch.Tensor | None, dest_row_TK: torch.Tensor
) -> torch.Tensor:
    """Sum each token's k expert outputs weighted by its combine weights (differentiable
    in both `out_RD` and `w_TK`). Keeps the expert outputs and weights for backward, never
    a [T, K, D] buffer. `w_TK=None`: the rows already carry their weights (the experts
    applied them), so the plain sum keeps only the rows' index for backward."""
    if w_TK is None:
        return _Sum.apply(out_RD, dest_row_TK)
    return _Combine.apply(out_RD, w_TK, dest_row_TK)
