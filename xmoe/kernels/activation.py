"""Expert activation with the combine weight folded in: a_RF = w_R * act(h_RF).

The combine sums w_tk * y_tk over a token's k expert outputs, and y = a @ W2 is linear
in a, so the weight can scale the activation instead: y' = (w * a) @ W2 and the combine
becomes a plain sum. What that saves:
  - memory: the combine no longer keeps the expert outputs [R, D] for the weight
    gradient (w's gradient is <grad_y, y> = <grad_a', act(h)>, computed here from h);
  - time: the weight gradient comes out of the activation's backward pass, which reads
    h and grad_a' anyway, so the combine's row-dot kernel goes.
One kernel each way, saving only the pre-activation h (and h3 for SwiGLU) and w:
  gelu:    a' = w * h * Phi(h)                   (the erf GELU of `F.gelu`)
  swiglu:  a' = w * silu(h) * h3
  backward: grad_w[r] = sum_f grad_a'[r, f] * act(h)[r, f]   (fp32)
            grad_h = grad_a' * w * act'(h), grad_h3 = grad_a' * w * silu(h)
Computed in fp32 (fp64 for fp64 inputs), stored in h's dtype. The torch reference below
runs where Triton does not (`backend.use_triton`).

GELU's Phi(h) = erfc(-h / sqrt 2) / 2, as the torch reference computes it. In fp64 the
kernels take it from `erf` (exact to 1e-16 absolute). In fp32 they evaluate erfc(x), x =
|h| / sqrt 2, branch-free as t * exp(P(t) - x^2) with t = 1 / (1 + x / 2) and P a
degree-9 polynomial fitted to log(erfcx(x) / t) over all x >= 0 (minimax-weighted least
squares in fp64; its error is below 1e-7, so erfc's relative error is too), and Phi(h) =
erfc / 2 for h < 0 and 1 - erfc / 2 otherwise (`_gelu_cdf`, one helper both kernels
call). Against the exact function Phi's error is at most 3e-7 absolute and 3e-5
relative, in the far negative tail as well, where 1 + erf(h / sqrt 2) cancels (there
F.gelu's fp32 result is off by more than 1 % on outputs below 8e-6 in magnitude, and by
100 % below 1e-7). Written this way, the erf's branches and its extra exp are gone: on
the H200 the forward and backward take about 0.215 and 0.29 ms at [98304, 1408] bf16,
against 0.24-0.27 and 0.35-0.38 ms with `erf` (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import math
import os

import torch

from xmoe.kernels.backend import HAVE_TRITON, acc_dtype, device, kernel, next_pow2, use_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @device
    def _gelu_cdf(h, FP64: tl.constexpr):
        """Phi(h): from `erf` in fp64, else from the fitted erfc (module docstring)."""
        if FP64:
            return 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        x = tl.abs(h) * 0.7071067811865476
        t = 1.0 / (1.0 + 0.5 * x)
        p = 0.16876059920981762 * t - 0.8133246826891304
        p = p * t + 1.4732550869336176
        p = p * t - 1.1211007111207663
        p = p * t + 0.27135256828654053
        p = p * t - 0.1839666379047212
        p = p * t + 0.09638823735647323
        p = p * t + 0.374125027477046
        p = p * t + 1.000022650263289
        p = p * t - 1.2655122201069444
        q = t * tl.exp(p - x * x)  # erfc(x)
        return tl.where(h >= 0, 1.0 - 0.5 * q, 0.5 * q)

    @kernel(rows=("R",))
    def _scaled_act_fwd_kernel(
        h_ptr,
        h3_ptr,
        w_ptr,
        out_ptr,
        R,
        F,
        SWIGLU: tl.constexpr,
        ACC_FP64: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_F: tl.constexpr,
    ):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        mr = r < R
        m = mr[:, None] & (f < F)[None, :]
        acc_ty = tl.float64 if ACC_FP64 else tl.float32
        off = r.to(tl.int64)[:, None] * F + f[None, :]
        h = tl.load(h_ptr + off, mask=m, other=0.0).to(acc_ty)
        h3 = h
        if SWIGLU:
            h3 = tl.load(h3_ptr + off, mask=m, other=0.0).to(acc_ty)
        w = tl.load(w_ptr + r, mask=mr, other=0.0).to(acc_ty)
        if SWIGLU:
            a = h * h3 / (1.0 + tl.exp(-h))
        else:
            a = h * _gelu_cdf(h, ACC_FP64)
        tl.store(out_ptr + off, (a * w[:, None]).to(out_ptr.dtype.element_ty), mask=m)

    @kernel(rows=("R",))
    def _scaled_act_bwd_kernel(
        h_ptr,
        h3_ptr,
        w_ptr,
        g_ptr,
        dh_ptr,
        dh3_ptr,
        dw_ptr,
        R,
        F,
        SWIGLU: tl.constexpr,
        ACC_FP64: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_F: tl.constexpr,
    ):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        mr = r < R
        acc_ty = tl.float64 if ACC_FP64 else tl.float32
        w = tl.load(w_ptr + r, mask=mr, other=0.0).to(acc_ty)
        dw = tl.zeros((BLOCK_R,), dtype=acc_ty)
        for f0 in range(0, F, BLOCK_F):
            f = f0 + tl.arange(0, BLOCK_F)
            m = mr[:, None] & (f < F)[None, :]
            off = r.to(tl.int64)[:, None] * F + f[None, :]
            h = tl.load(h_ptr + off, mask=m, other=0.0).to(acc_ty)
            h3 = h
            if SWIGLU:
                h3 = tl.load(h3_ptr + off, mask=m, other=0.0).to(acc_ty)
            g = tl.load(g_ptr + off, mask=m, other=0.0).to(acc_ty)
            gw = g * w[:, None]
            if SWIGLU:
                sig = 1.0 / (1.0 + tl.exp(-h))
                silu = h * sig
                dw += tl.sum(g * silu * h3, axis=1)
                da_dh = h3 * sig * (1.0 + h * (1.0 - sig))
                tl.store(dh3_ptr + off, (gw * silu).to(dh3_ptr.dtype.element_ty), mask=m)
            else:
                cdf = _gelu_cdf(h, ACC_FP64)
                dw += tl.sum(g * h * cdf, axis=1)
                da_dh = cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327
            tl.store(dh_ptr + off, (gw * da_dh).to(dh_ptr.dtype.element_ty), mask=m)
        tl.store(dw_ptr + r, dw.to(dw_ptr.dtype.element_ty), mask=mr)


# --------------------------------------------------------------------------- torch reference


def _act_torch(h: torch.Tensor, h3: torch.Tensor | None):
    """act(h), d act/d h, d act/d h3 (None for GELU), in h's (accumulation) dtype."""
    if h3 is None:
        cdf = 0.5 * torch.erfc(h * (-1.0 / math.sqrt(2.0)))  # no cancellation for h << 0
        pdf = torch.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)
        return h * cdf, cdf + h * pdf, None
    sig = torch.sigmoid(h)
    silu = h * sig
    return silu * h3, h3 * sig * (1.0 + h * (1.0 - sig)), silu


def scaled_act_fwd_torch(h_RF, h3_RF, w_R) -> torch.Tensor:
    acc = acc_dtype(h_RF.dtype)
    a, _, _ = _act_torch(h_RF.to(acc), None if h3_RF is None else h3_RF.to(acc))
    return (a * w_R.to(acc)[:, None]).to(h_RF.dtype)


def scaled_act_bwd_torch(h_RF, h3_RF, w_R, g_RF):
    acc = acc_dtype(h_RF.dtype)
    a, da_dh, da_dh3 = _act_torch(h_RF.to(acc), None if h3_RF is None else h3_RF.to(acc))
    g = g_RF.to(acc)
    gw = g * w_R.to(acc)[:, None]
    dh3 = None if h3_RF is None else (gw * da_dh3).to(h3_RF.dtype)
    return (gw * da_dh).to(h_RF.dtype), dh3, (g * a).sum(1).to(w_R.dtype)


# --------------------------------------------------------------------------- launchers


# (rows, BLOCK_F, warps) of the forward and of the backward kernel on a GPU; the backward
# program walks its rows' whole width in BLOCK_F steps (it sums each row's dw). The best
# on the H200 at [98304, 1408] bf16 in a sweep (`moe_layer.py --sweep-act`) and a probe
# after the fitted erfc (docs/PERFORMANCE.md): forward 0.215 ms, backward 0.29 ms
GPU_CONFIG = ((16, 128, 4), (8, 128, 4))


def act_config(F: int, gpu: bool) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """((rows, BLOCK_F, warps) forward, the same backward) for width F.
    XMOE_ACT_CONFIG="16,128,4;32,128,4" overrides the GPU's (`moe_layer.py --sweep-act`);
    the interpreter takes small blocks so that the tests cover several per row."""
    fit = max(16, next_pow2(F))  # no block wider than the row needs
    if not gpu:
        block_f = min(128, fit)
        return (max(1, 2048 // block_f), block_f, 4), (32, block_f, 4)
    fwd, bwd = GPU_CONFIG
    override = os.environ.get("XMOE_ACT_CONFIG")
    if override:
        fwd, bwd = (tuple(int(v) for v in part.split(",")) for part in override.split(";"))
    return (fwd[0], min(fwd[1], fit), fwd[2]), (bwd[0], min(bwd[1], fit), bwd[2])


def scaled_act_fwd(h_RF, h3_RF, w_R) -> torch.Tensor:
    if not use_triton(h_RF):
        return scaled_act_fwd_torch(h_RF, h3_RF, w_R)
    h_RF = h_RF.contiguous()
    h3_RF = h3_RF.contiguous() if h3_RF is not None else None
    R, F = h_RF.shape
    out = torch.empty_like(h_RF)
    if R * F == 0:
        return out
    (br, bf, warps), _ = act_config(F, h_RF.is_cuda)
    _scaled_act_fwd_kernel[(triton.cdiv(R, br), triton.cdiv(F, bf))](
        h_RF,
        h3_RF if h3_RF is not None else h_RF,
        w_R.contiguous(),
        out,
        R,
        F,
        SWIGLU=h3_RF is not None,
        ACC_FP64=acc_dtype(h_RF.dtype) == torch.float64,
        BLOCK_R=br,
        BLOCK_F=bf,
        num_warps=warps,
    )
    return out


def scaled_act_bwd(h_RF, h3_RF, w_R, g_RF):
    if not use_triton(h_RF):
        return scaled_act_bwd_torch(h_RF, h3_RF, w_R, g_RF)
    R, F = h_RF.shape
    dh = torch.empty_like(h_RF)
    dh3 = torch.empty_like(h3_RF) if h3_RF is not None else None
    dw = torch.empty_like(w_R)
    if R == 0:
        return dh, dh3, dw
    if F == 0:
        return dh, dh3, dw.zero_()
    _, (br, bf, warps) = act_config(F, h_RF.is_cuda)  # whole rows a program
    _scaled_act_bwd_kernel[(triton.cdiv(R, br),)](
        h_RF,
        h3_RF if h3_RF is not None else h_RF,
        w_R.contiguous(),
        g_RF.contiguous(),
        dh,
        dh3 if dh3 is not None else dh,
        dw,
        R,
        F,
        SWIGLU=h3_RF is not None,
        ACC_FP64=acc_dtype(h_RF.dtype) == torch.float64,
        BLOCK_R=br,
        BLOCK_F=bf,
        num_warps=warps,
    )
    return dh, dh3, dw


class _ScaledAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_RF, h3_RF, w_R):
        h_RF = h_RF.contiguous()
        h3_RF = h3_RF.contiguous() if h3_RF is not None else None
        ctx.save_for_backward(h_RF, h3_RF, w_R)
        return scaled_act_fwd(h_RF, h3_RF, w_R)

    @staticmethod
    def backward(ctx, g_RF):
        h_RF, h3_RF, w_R = ctx.saved_tensors
        return scaled_act_bwd(h_RF, h3_RF, w_R, g_RF)


def scaled_activation(
    h_RF: torch.Tensor, h3_RF: torch.Tensor | None, w_R: torch.Tensor
) -> torch.Tensor:
    """w_R[:, None] * gelu(h_RF) (h3_RF None) or * silu(h_RF) * h3_RF (SwiGLU),
    differentiable in all three; keeps only its inputs for backward."""
    if h3_RF is not None and h3_RF.shape != h_RF.shape:
        raise ValueError(f"scaled_activation: h3 {tuple(h3_RF.shape)} != h {tuple(h_RF.shape)}")
    return _ScaledAct.apply(h_RF, h3_RF, w_R)
