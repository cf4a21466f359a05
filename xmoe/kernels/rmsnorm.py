"""RMSNorm in one kernel each way, keeping only its input and the per-row 1/rms.

  forward:   r = 1 / sqrt(mean(x^2) + eps)          (fp32, per row)
             y = round(round(x * r) * w)             (as `RMSNorm` always computed it: the
                                                      normalised row rounded to x's dtype,
                                                      then scaled by the weight)
  backward:  dn = round(g * w)                       (the gradient of the rounded row)
             dx = r * (dn - n * mean(dn * n)),  n = x * r
             dw = sum over rows of g * round(n)      (fp32 partial sums per program)
The unfused version ran about eight elementwise and reduction kernels each way and kept
an fp32 copy of the input (4 bytes per element) plus the normalised row (2) for backward;
this keeps the input (2, usually the residual stream) and 4 bytes per row. Computed in
fp32 (fp64 for fp64 inputs). The torch reference below runs where Triton does not.
"""

from __future__ import annotations

import torch

from xmoe.kernels.backend import (
    HAVE_TRITON,
    acc_dtype,
    kernel,
    next_pow2,
    split_rows,
    use_triton,
)

if HAVE_TRITON:
    import triton.language as tl

    @kernel
    def _rmsnorm_fwd_kernel(
        x_ptr,
        w_ptr,
        y_ptr,
        rstd_ptr,
        T,
        D,
        eps,
        ACC_FP64: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        md = d < D
        acc_ty = tl.float64 if ACC_FP64 else tl.float32
        x = tl.load(x_ptr + t * D + d, mask=md, other=0.0).to(acc_ty)
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        n = (x * r).to(y_ptr.dtype.element_ty).to(acc_ty)
        w = tl.load(w_ptr + d, mask=md, other=0.0).to(acc_ty)
        tl.store(y_ptr + t * D + d, (n * w).to(y_ptr.dtype.element_ty), mask=md)
        tl.store(rstd_ptr + t, r)

    @kernel
    def _rmsnorm_bwd_kernel(
        g_ptr,
        x_ptr,
        w_ptr,
        rstd_ptr,
        dx_ptr,
        dw_part_ptr,
        T,
        D,
        rows_per_prog,
        ACC_FP64: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        p = tl.program_id(0)
        d = tl.arange(0, BLOCK_D)
        md = d < D
        acc_ty = tl.float64 if ACC_FP64 else tl.float32
        w = tl.load(w_ptr + d, mask=md, other=0.0).to(acc_ty)
        dw = tl.zeros((BLOCK_D,), dtype=acc_ty)
        for i in range(0, rows_per_prog):
            t = p.to(tl.int64) * rows_per_prog + i
            if t < T:
                x = tl.load(x_ptr + t * D + d, mask=md, other=0.0).to(acc_ty)
                g = tl.load(g_ptr + t * D + d, mask=md, other=0.0).to(acc_ty)
                r = tl.load(rstd_ptr + t).to(acc_ty)
                n = x * r
                dw += g * n.to(dx_ptr.dtype.element_ty).to(acc_ty)
                dn = (g * w).to(dx_ptr.dtype.element_ty).to(acc_ty)
                c = tl.sum(dn * n, axis=0) / D
                tl.store(
                    dx_ptr + t * D + d, (r * (dn - n * c)).to(dx_ptr.dtype.element_ty), mask=md
                )
        tl.store(dw_part_ptr + p * D + d, dw, mask=md)


# --------------------------------------------------------------------------- torch reference


def rmsnorm_fwd_torch(x_TD: torch.Tensor, w_D: torch.Tensor, eps: float):
    acc = acc_dtype(x_TD.dtype)
    xf = x_TD.to(acc)
    rstd_T = torch.rsqrt(xf.square().mean(-1) + eps)
    n = (xf * rstd_T[:, None]).to(x_TD.dtype)
    return (n.to(acc) * w_D.to(acc)).to(x_TD.dtype), rstd_T


def rmsnorm_bwd_torch(g_TD, x_TD, w_D, rstd_T):
    acc = acc_dtype(x_TD.dtype)
    n = x_TD.to(acc) * rstd_T[:, None]
    g = g_TD.to(acc)
    dw = (g * n.to(x_TD.dtype).to(acc)).sum(0)
    dn = (g * w_D.to(acc)).to(x_TD.dtype).to(acc)
    c = (dn * n).mean(-1, keepdim=True)
    dx = (rstd_T[:, None] * (dn - n * c)).to(x_TD.dtype)
    return dx, dw.to(w_D.dtype)


# --------------------------------------------------------------------------- launchers


def _warps(block_d: int) -> int:
    return max(1, min(16, block_d // 256))


def rmsnorm_fwd(x_TD: torch.Tensor, w_D: torch.Tensor, eps: float):
    if not use_triton(x_TD):
        return rmsnorm_fwd_torch(x_TD, w_D, eps)
    T, D = x_TD.shape
    y = torch.empty_like(x_TD)
    rstd = torch.empty(T, dtype=acc_dtype(x_TD.dtype), device=x_TD.device)
    if T == 0:
        return y, rstd
    block_d = next_pow2(D)
    _rmsnorm_fwd_kernel[(T,)](
        x_TD,
        w_D.contiguous(),
        y,
        rstd,
        T,
        D,
        eps,
        ACC_FP64=rstd.dtype == torch.float64,
        BLOCK_D=block_d,
        num_warps=_warps(block_d),
    )
    return y, rstd


def rmsnorm_bwd(g_TD, x_TD, w_D, rstd_T):
    if not use_triton(x_TD):
        return rmsnorm_bwd_torch(g_TD, x_TD, w_D, rstd_T)
    T, D = x_TD.shape
    dx = torch.empty_like(x_TD)
    if T == 0:
        return dx, torch.zeros_like(w_D)
    progs, rows = split_rows(T, x_TD.device)
    part = torch.empty(progs, D, dtype=rstd_T.dtype, device=x_TD.device)
    block_d = next_pow2(D)
    _rmsnorm_bwd_kernel[(progs,)](
        g_TD.contiguous(),
        x_TD,
        w_D.contiguous(),
        rstd_T,
        dx,
        part,
        T,
        D,
        rows,
        ACC_FP64=rstd_T.dtype == torch.float64,
        BLOCK_D=block_d,
        num_warps=_warps(block_d),
    )
    return dx, part.sum(0).to(w_D.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_D, eps):
        y, rstd = rmsnorm_fwd(x_TD, w_D, eps)
        ctx.save_for_backward(x_TD, w_D, rstd)
        return y

    @staticmethod
    def backward(ctx, g_TD):
        x_TD, w_D, rstd = ctx.saved_tensors
        dx, dw = rmsnorm_bwd(g_TD, x_TD, w_D, rstd)
        return dx, dw, None


def rms_norm(x: torch.Tensor, w_D: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of x (any leading shape), scaled by w_D."""
    shape = x.shape
    y = _RMSNorm.apply(x.reshape(-1, shape[-1]).contiguous(), w_D, eps)
    return y.view(shape)
