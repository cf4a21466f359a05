"""Triton grouped GEMM kernels: y = x·w per expert over expert-grouped rows, and dw = xᵀ·dy.

The path where torch._grouped_mm has no bf16 (ROCm gfx90a, Frontier's MI250X) or does
not exist. Row tiles never straddle two experts: the host plans them from the counts
(`tile_map`). `xmoe.kernels.grouped_gemm` wraps these in autograd.
"""

from __future__ import annotations

import os

import torch

from xmoe.kernels.backend import HAVE_TRITON, host_to_device, kernel

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @kernel
    def _gmm_kernel(
        x_ptr,
        w_ptr,
        y_ptr,
        tile_e_ptr,
        tile_m_ptr,
        end_ptr,
        N,
        K,
        s_xm,
        s_xk,
        s_we,
        s_wk,
        s_wn,
        s_ym,
        s_yn,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
        ACC_FP64: tl.constexpr,
        EVEN_K: tl.constexpr,
        EVEN_N: tl.constexpr,
    ):
        # One program per (row tile of one expert, column tile); tiles never straddle experts.
        # Column tiles vary fastest: the programs running together share one row tile of x
        # and one expert's weights, so both come from L2 rather than once per column tile.
        pid = tl.program_id(0)
        n_tiles = tl.cdiv(N, BN)
        tile = pid // n_tiles
        e = tl.load(tile_e_ptr + tile).to(tl.int64)
        m0 = tl.load(tile_m_ptr + tile)
        end = tl.load(end_ptr + e)
        rm = m0 + tl.arange(0, BM)
        rn = (pid % n_tiles) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        mm = rm < end
        mn = rn < N
        x_ptrs = x_ptr + rm[:, None].to(tl.int64) * s_xm + rk[None, :] * s_xk
        w_ptrs = w_ptr + e * s_we + rk[:, None] * s_wk + rn[None, :] * s_wn
        # fp64 operands need an fp64 accumulator: tl.dot returns fp64 for them, and with an
        # fp32 one the interpreter stores 4-byte values into the 8-byte rows of y, leaving
        # half of every element as whatever the empty buffer held.
        acc = tl.zeros((BM, BN), dtype=tl.float64 if ACC_FP64 else tl.float32)
        for k0 in range(0, K, BK):
            # EVEN_K / EVEN_N (K % BK == 0, N % BN == 0): no mask on those dimensions, so
            # the loads stay plain vector loads the pipeliner can overlap with the MMAs
            if EVEN_K:
                a = tl.load(x_ptrs, mask=mm[:, None], other=0.0)
                if EVEN_N:
                    b = tl.load(w_ptrs)
                else:
                    b = tl.load(w_ptrs, mask=mn[None, :], other=0.0)
            else:
                mk = (k0 + rk) < K
                a = tl.load(x_ptrs, mask=mm[:, None] & mk[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=mk[:, None] & mn[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
            x_ptrs += BK * s_xk
            w_ptrs += BK * s_wk
        tl.store(
            y_ptr + rm[:, None].to(tl.int64) * s_ym + rn[None, :] * s_yn,
            acc.to(y_ptr.dtype.element_ty),
            mask=mm[:, None] & mn[None, :],
        )

    @kernel
    def _gmm_wgrad_kernel(
        x_ptr,
        dy_ptr,
        dw_ptr,
        start_ptr,
        end_ptr,
        K,
        N,
        s_xm,
        s_xk,
        s_dym,
        s_dyn,
        s_we,
        s_wk,
        s_wn,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BR: tl.constexpr,
        ACC_FP64: tl.constexpr,
    ):
        # dw[e] = x[rows of e]^T @ dy[rows of e]; an expert with no rows gets zeros.
        # The expert varies slowest: the programs running together read the same expert's
        # rows of x and dy, which then stay in L2 instead of being re-read per output tile.
        pid = tl.program_id(0)
        k_tiles = tl.cdiv(K, BM)
        n_tiles = tl.cdiv(N, BN)
        e = (pid // (k_tiles * n_tiles)).to(tl.int64)
        rest = pid % (k_tiles * n_tiles)
        rk = (rest // n_tiles) * BM + tl.arange(0, BM)
        rn = (rest % n_tiles) * BN + tl.arange(0, BN)
        mk = rk < K
        mn = rn < N
        start = tl.load(start_ptr + e)
        end = tl.load(end_ptr + e)
        acc = tl.zeros((BM, BN), dtype=tl.float64 if ACC_FP64 else tl.float32)
        for r0 in range(start, end, BR):
            rr = r0 + tl.arange(0, BR)
            mr = rr < end
            a = tl.load(
                x_ptr + rr[None, :].to(tl.int64) * s_xm + rk[:, None] * s_xk,
                mask=mk[:, None] & mr[None, :],
                other=0.0,
            )
            b = tl.load(
                dy_ptr + rr[:, None].to(tl.int64) * s_dym + rn[None, :] * s_dyn,
                mask=mr[:, None] & mn[None, :],
                other=0.0,
            )
            acc = tl.dot(a, b, acc)
        tl.store(
            dw_ptr + e * s_we + rk[:, None] * s_wk + rn[None, :] * s_wn,
            acc.to(dw_ptr.dtype.element_ty),
            mask=mk[:, None] & mn[None, :],
        )


def tile_map(counts: list[int], bm: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row tile: its expert and first row; per expert: its end row."""
    tile_e, tile_m, ends = [], [], []
    start = 0
    for e, c in enumerate(counts):
        for m0 in range(start, start + c, bm):
            tile_e.append(e)
            tile_m.append(m0)
        start += c
        ends.append(start)
    packed = host_to_device(tile_e + tile_m + ends, device, torch.int32)
    n = len(tile_e)
    return packed[:n], packed[n : 2 * n], packed[2 * n :]


def config(dtype: torch.dtype, interpret: bool) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, warps, stages); XMOE_TRITON_GMM_CONFIG="128,128,64,8,3" overrides it
    on the GPU (tuning for a new device: `benchmarks/moe_layer.py --sweep-gemm`)."""
    override = os.environ.get("XMOE_TRITON_GMM_CONFIG")
    if override and not interpret:
        bm, bn, bk, warps, stages = (int(v) for v in override.split(","))
        return bm, bn, bk, warps, stages
    if interpret:
        return 16, 16, 16, 1, 1
    if torch.version.hip is not None:
        # AMD CDNA has 64 KiB of LDS per CU: keep A+B tiles x stages well under it
        return (64, 64, 32, 4, 2) if dtype == torch.float32 else (128, 128, 32, 8, 2)
    if dtype == torch.float32:
        return 64, 64, 32, 4, 3
    # best of the H200 sweep (128x256x64: 315 TFLOP/s fwd+bwd vs 280 for 128x128x64)
    return 128, 256, 64, 8, 3


def gmm_forward(x_RK, w_EKN, tiles, N: int) -> torch.Tensor:
    tile_e, tile_m, ends = tiles
    R, K = x_RK.shape
    y_RN = torch.empty(R, N, dtype=x_RK.dtype, device=x_RK.device)
    if tile_e.numel() == 0 or N == 0:
        return y_RN.zero_() if N else y_RN
    bm, bn, bk, warps, stages = config(x_RK.dtype, not x_RK.is_cuda)
    grid = (tile_e.numel() * triton.cdiv(N, bn),)
    _gmm_kernel[grid](
        x_RK,
        w_EKN,
        y_RN,
        tile_e,
        tile_m,
        ends,
        N,
        K,
        x_RK.stride(0),
        x_RK.stride(1),
        w_EKN.stride(0),
        w_EKN.stride(1),
        w_EKN.stride(2),
        y_RN.stride(0),
        y_RN.stride(1),
        BM=bm,
        BN=bn,
        BK=bk,
        ACC_FP64=x_RK.dtype == torch.float64,
        EVEN_K=K % bk == 0,
        EVEN_N=N % bn == 0,
        num_warps=warps,
        num_stages=stages,
    )
    return y_RN


def gmm_wgrad(x_RK, dy_RN, ends, E: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """dw = xᵀ·dy per expert, [E, K, N]; with the strides of `like` (the weight) when
    given, so a transposed-view weight's gradient needs no layout copy."""
    R, K = x_RK.shape
    N = dy_RN.shape[1]
    if like is not None:
        dw_EKN = torch.empty_like(like, dtype=x_RK.dtype)
    else:
        dw_EKN = torch.empty(E, K, N, dtype=x_RK.dtype, device=x_RK.device)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]]) if E else ends
    bm, bn, bk, warps, stages = config(x_RK.dtype, not x_RK.is_cuda)
    if E == 0 or K == 0 or N == 0:
        return dw_EKN.zero_()
    grid = (E * triton.cdiv(K, bm) * triton.cdiv(N, bn),)
    _gmm_wgrad_kernel[grid](
        x_RK,
        dy_RN,
        dw_EKN,
        starts,
        ends,
        K,
        N,
        x_RK.stride(0),
        x_RK.stride(1),
        dy_RN.stride(0),
        dy_RN.stride(1),
        dw_EKN.stride(0),
        dw_EKN.stride(1),
        dw_EKN.stride(2),
        BM=bm,
        BN=bn,
        BR=bk,
        ACC_FP64=x_RK.dtype == torch.float64,
        num_warps=warps,
        num_stages=stages,
    )
    return dw_EKN
