"""Permute token rows into the expert-grouped buffer, and its adjoint (unpermute-sum).

  scatter_rows: out_RD[dest_row_TK[t, k]] = x_TD[t] (* w_TK[t, k])   (skips -1)
                reads each token's row once and writes it to its k rows: each routed
                row is copied once, no [T*K, D] repeat. Rows no assignment names are
                not written.
  gather_rows:  out_RD[r] = x_TD[src_slot_R[r] // K] (* w_N[src_slot_R[r]])
                the same rows read by index; what the dispatchers use for a plain row
                permutation (K = 1). For K > 1 it reads a token's row K times, where
                the scatter reads it once: 0.135 against 0.121 ms a pass in the
                benchmark's step ([98304, 2048] bf16, one H200; docs/PERFORMANCE.md).
  unpermute:    y_TD[t] = sum_k (w_TK[t, k] *) rows_RD[dest_row_TK[t, k]]   (skips -1)
                a gather per token, so no atomics and a deterministic sum order.

`permute` is the differentiable wrapper the dispatchers call: forward scatters the kept
rows, backward sums each token's row gradients with `unpermute`. `permute_with_weights`
also brings each row's combine weight from the same kernel, for experts that fold the
weights in. Each kernel has a torch reference below it; `backend.use_triton` picks one.
"""

from __future__ import annotations

import torch

from xmoe.kernels.backend import HAVE_TRITON, acc_dtype, kernel, next_pow2, use_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @kernel(rows=("R",))
    def _gather_rows_kernel(
        src_ptr,
        out_ptr,
        slot_ptr,
        w_ptr,
        R,
        D,
        K,
        s_src,
        s_out,
        HAS_W: tl.constexpr,
        ACC_FP64: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mr = r < R
        m = mr[:, None] & (d < D)[None, :]
        slot = tl.load(slot_ptr + r, mask=mr, other=0)
        tok = slot // K
        v = tl.load(src_ptr + tok[:, None] * s_src + d[None, :], mask=m, other=0.0)
        if HAS_W:
            acc_ty = tl.float64 if ACC_FP64 else tl.float32
            w = tl.load(w_ptr + slot, mask=mr, other=0.0).to(acc_ty)
            v = v.to(acc_ty) * w[:, None]
        tl.store(
            out_ptr + r[:, None].to(tl.int64) * s_out + d[None, :],
            v.to(out_ptr.dtype.element_ty),
            mask=m,
        )

    @kernel(rows=("T", "R"))
    def _scatter_rows_kernel(
        src_ptr,
        out_ptr,
        dest_ptr,
        w_ptr,
        wout_ptr,
        T,
        R,
        D,
        K,
        s_src,
        s_out,
        HAS_W: tl.constexpr,
        W_OUT: tl.constexpr,
        ACC_FP64: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mt = t < T
        md = d < D
        v = tl.load(
            src_ptr + t[:, None].to(tl.int64) * s_src + d[None, :],
            mask=mt[:, None] & md[None, :],
            other=0.0,
        )
        for k in range(0, K):
            idx = tl.load(dest_ptr + t * K + k, mask=mt, other=-1)
            valid = mt & (idx >= 0) & (idx < R)  # (a row past the buffer is never written)
            out = v
            if HAS_W or W_OUT:
                w = tl.load(w_ptr + t * K + k, mask=valid, other=0.0)
            if HAS_W:
                acc_ty = tl.float64 if ACC_FP64 else tl.float32
                out = v.to(acc_ty) * w.to(acc_ty)[:, None]
            tl.store(
                out_ptr + idx[:, None] * s_out + d[None, :],
                out.to(out_ptr.dtype.element_ty),
                mask=valid[:, None] & md[None, :],
            )
            if W_OUT:  # each row's weight, beside it (by the first column block)
                tl.store(wout_ptr + idx, w, mask=valid & (tl.program_id(1) == 0))

    @kernel(rows=("T",))
    def _unpermute_kernel(
        rows_ptr,
        out_ptr,
        dest_ptr,
        w_ptr,
        T,
        D,
        K,
        s_rows,
        s_out,
        HAS_W: tl.constexpr,
        ACC_FP64: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mt = t < T
        md = d < D
        acc_ty = tl.float64 if ACC_FP64 else tl.float32
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=acc_ty)
        for k in range(0, K):
            idx = tl.load(dest_ptr + t * K + k, mask=mt, other=-1)
            valid = mt & (idx >= 0)
            v = tl.load(
                rows_ptr + idx[:, None] * s_rows + d[None, :],
                mask=valid[:, None] & md[None, :],
                other=0.0,
            ).to(acc_ty)
            if HAS_W:
                w = tl.load(w_ptr + t * K + k, mask=valid, other=0.0).to(acc_ty)
                v = v * w[:, None]
            acc += v
        tl.store(
            out_ptr + t[:, None].to(tl.int64) * s_out + d[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=mt[:, None] & md[None, :],
        )


def _tiles(D: int) -> tuple[int, int]:
    """(rows, BLOCK_D) of `gather_rows`: 4096 values a program."""
    block_d = min(256, max(16, next_pow2(D)))
    return max(1, 4096 // block_d), block_d


def _token_tiles(D: int, gpu: bool) -> tuple[int, int, int]:
    """(tokens, BLOCK_D, warps) of the kernels that walk tokens (`scatter_rows`,
    `unpermute`): on a GPU a program takes a whole row of up to 2048 values, the best of
    a sweep at D = 2048 on the H200 (one token and 8 warps; with 16 tokens of 256 columns
    `unpermute` took 0.126 ms a pass in the benchmark's step, now 0.114). The
    interpreter takes several tokens of narrow blocks, so the tests cover both masks."""
    if not gpu:
        block_d = min(256, max(16, next_pow2(D)))
        return max(1, 4096 // block_d), block_d, 4
    block_d = min(2048, max(16, next_pow2(D)))
    return max(1, 2048 // block_d), block_d, 8 if block_d >= 1024 else 4


# --------------------------------------------------------------------------- gather_rows


def gather_rows_torch(
    x_TD: torch.Tensor, src_slot_R: torch.Tensor, top_k: int, w_N: torch.Tensor | None = None
) -> torch.Tensor:
    out_RD = x_TD.index_select(0, src_slot_R // top_k)
    if w_N is not None:
        acc = acc_dtype(x_TD.dtype)
        out_RD = (out_RD.to(acc) * w_N[src_slot_R].to(acc)[:, None]).to(x_TD.dtype)
    return out_RD


def gather_rows(
    x_TD: torch.Tensor, src_slot_R: torch.Tensor, top_k: int, w_N: torch.Tensor | None = None
) -> torch.Tensor:
    """Row r of the result is token src_slot_R[r] // top_k of x_TD, scaled by w_N[slot]."""
    if not use_triton(x_TD):
        return gather_rows_torch(x_TD, src_slot_R, top_k, w_N)
    x_TD = x_TD.contiguous()
    R, D = src_slot_R.numel(), x_TD.shape[1]
    out_RD = torch.empty(R, D, dtype=x_TD.dtype, device=x_TD.device)
    if R == 0 or D == 0:
        return out_RD
    br, bd = _tiles(D)
    w = w_N.contiguous() if w_N is not None else src_slot_R
    grid = (triton.cdiv(R, br), triton.cdiv(D, bd))
    _gather_rows_kernel[grid](
        x_TD,
        out_RD,
        src_slot_R.contiguous(),
        w,
        R,
        D,
        top_k,
        x_TD.stride(0),
        out_RD.stride(0),
        HAS_W=w_N is not None,
        ACC_FP64=acc_dtype(x_TD.dtype) == torch.float64,
        BLOCK_R=br,
        BLOCK_D=bd,
    )
    return out_RD


# --------------------------------------------------------------------------- scatter_rows


def scatter_rows_torch(
    x_TD: torch.Tensor,
    dest_row_TK: torch.Tensor,
    n_rows: int,
    w_TK: torch.Tensor | None = None,
    weights_out: bool = False,
):
    T, K = dest_row_TK.shape
    dest_N = dest_row_TK.reshape(-1)
    slot_M = (dest_N >= 0).nonzero().squeeze(1)
    vals_MD = x_TD.index_select(0, slot_M // K)
    scale = w_TK is not None and not weights_out
    if scale:
        acc = acc_dtype(x_TD.dtype)
        vals_MD = (vals_MD.to(acc) * w_TK.reshape(-1)[slot_M].to(acc)[:, None]).to(x_TD.dtype)
    out_RD = torch.empty(n_rows, x_TD.shape[1], dtype=x_TD.dtype, device=x_TD.device)
    out_RD.index_copy_(0, dest_N[slot_M], vals_MD)
    if not weights_out:
        return out_RD
    w_R = torch.empty(n_rows, dtype=w_TK.dtype, device=w_TK.device)
    return out_RD, w_R.index_copy_(0, dest_N[slot_M], w_TK.reshape(-1)[slot_M])


def scatter_rows(
    x_TD: torch.Tensor,
    dest_row_TK: torch.Tensor,
    n_rows: int,
    w_TK: torch.Tensor | None = None,
    weights_out: bool = False,
):
    """[n_rows, D] with row dest_row_TK[t, k] = x_TD[t] (* w_TK[t, k]) for every kept
    assignment (dest >= 0). Kept rows are distinct and below n_rows; rows that no
    assignment names are left uninitialised (e.g. past the kept count in a buffer sized
    for every assignment, filled before the host knows that count).

    `weights_out`: the rows are not scaled; instead each row's weight comes back beside
    them, (rows [n_rows, D], w_R [n_rows]) with w_R[dest_row_TK[t, k]] = w_TK[t, k], from
    the same kernel (the experts fold the weights in later)."""
    if weights_out and w_TK is None:
        raise ValueError("scatter_rows: weights_out needs w_TK")
    if not use_triton(x_TD):
        return scatter_rows_torch(x_TD, dest_row_TK, n_rows, w_TK, weights_out)
    x_TD = x_TD.contiguous()
    T, K = dest_row_TK.shape
    D = x_TD.shape[1]
    out_RD = torch.empty(n_rows, D, dtype=x_TD.dtype, device=x_TD.device)
    w_R = torch.empty(n_rows, dtype=w_TK.dtype, device=x_TD.device) if weights_out else None
    if T * K > 0 and n_rows > 0 and D > 0:
        bt, bd, warps = _token_tiles(D, x_TD.is_cuda)
        dest = dest_row_TK.contiguous()
        w = w_TK.contiguous() if w_TK is not None else dest
        _scatter_rows_kernel[(triton.cdiv(T, bt), triton.cdiv(D, bd))](
            x_TD, out_RD, dest, w, w_R if weights_out else dest,
            T, n_rows, D, K, x_TD.stride(0), out_RD.stride(0),
            HAS_W=w_TK is not None and not weights_out, W_OUT=weights_out,
            ACC_FP64=acc_dtype(x_TD.dtype) == torch.float64,
            BLOCK_T=bt, BLOCK_D=bd, num_warps=warps,
        )  # fmt: skip
    return (out_RD, w_R) if weights_out else out_RD


# --------------------------------------------------------------------------- unpermute


def unpermute_torch(
    rows_RD: torch.Tensor, dest_row_TK: torch.Tensor, w_TK: torch.Tensor | None = None
) -> torch.Tensor:
    T, K = dest_row_TK.shape
    D = rows_RD.shape[1]
    valid_N = (dest_row_TK >= 0).reshape(-1)
    slot_M = valid_N.nonzero().squeeze(1)
    acc = acc_dtype(rows_RD.dtype)
    vals_MD = rows_RD.index_select(0, dest_row_TK.reshape(-1)[slot_M]).to(acc)
    if w_TK is not None:
        vals_MD = vals_MD * w_TK.reshape(-1)[slot_M].to(acc)[:, None]
    y_TD = torch.zeros(T, D, dtype=acc, device=rows_RD.device)
    y_TD.index_add_(0, slot_M // K, vals_MD)
    return y_TD.to(rows_RD.dtype)


def unpermute(
    rows_RD: torch.Tensor, dest_row_TK: torch.Tensor, w_TK: torch.Tensor | None = None
) -> torch.Tensor:
    """y_TD[t] = sum over kept k of (w_TK[t, k] *) rows_RD[dest_row_TK[t, k]], accumulated in
    `acc_dtype` (fp32, fp64 for fp64 rows) like the torch reference."""
    if not use_triton(rows_RD):
        return unpermute_torch(rows_RD, dest_row_TK, w_TK)
    rows_RD = rows_RD.contiguous()
    T, K = dest_row_TK.shape
    D = rows_RD.shape[1]
    y_TD = torch.empty(T, D, dtype=rows_RD.dtype, device=rows_RD.device)
    if T == 0 or D == 0:
        return y_TD
    bt, bd, warps = _token_tiles(D, rows_RD.is_cuda)
    dest = dest_row_TK.contiguous()
    w = w_TK.contiguous() if w_TK is not None else dest
    grid = (triton.cdiv(T, bt), triton.cdiv(D, bd))
    _unpermute_kernel[grid](
        rows_RD,
        y_TD,
        dest,
        w,
        T,
        D,
        K,
        rows_RD.stride(0),
        y_TD.stride(0),
        HAS_W=w_TK is not None,
        ACC_FP64=acc_dtype(rows_RD.dtype) == torch.float64,
        BLOCK_T=bt,
        BLOCK_D=bd,
        num_warps=warps,
    )
    return y_TD


# --------------------------------------------------------------------------- autograd


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, n_rows, dest_row_TK):
        ctx.save_for_backward(dest_row_TK)
        return scatter_rows(x_TD, dest_row_TK, n_rows)

    @staticmethod
    def backward(ctx, grad_RD):
        (dest_row_TK,) = ctx.saved_tensors
        return unpermute(grad_RD.contiguous(), dest_row_TK), None, None


class _PermuteWithWeights(torch.autograd.Function):
    """(rows, each row's weight) from one scatter; backward: the rows' gradient summed
    per token, and each assignment's weight gradient read from its row."""

    @staticmethod
    def forward(ctx, x_TD, w_TK, n_rows, dest_row_TK):
        ctx.save_for_backward(dest_row_TK)
        return scatter_rows(x_TD, dest_row_TK, n_rows, w_TK, weights_out=True)

    @staticmethod
    def backward(ctx, grad_RD, grad_R):
        (dest_row_TK,) = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = unpermute(grad_RD.contiguous(), dest_row_TK)
        if ctx.needs_input_grad[1] and grad_R.numel() == 0:  # no rows: nothing kept
            dw = grad_R.new_zeros(dest_row_TK.shape)
        elif ctx.needs_input_grad[1]:
            kept = dest_row_TK >= 0
            dw = grad_R.take(torch.where(kept, dest_row_TK, 0)).masked_fill_(~kept, 0)
        return dx, dw, None, None


class _Gathered(torch.autograd.Function):
    """Rows copied from x_TD earlier, outside autograd (`scatter_rows` into `rows[0]`),
    joined to the graph now: backward sums each token's row gradients."""

    @staticmethod
    def forward(ctx, x_TD, dest_row_TK, rows):
        ctx.save_for_backward(dest_row_TK)
        return rows[0]

    @staticmethod
    def backward(ctx, grad_RD):
        (dest_row_TK,) = ctx.saved_tensors
        return unpermute(grad_RD.contiguous(), dest_row_TK), None, None


def attach_gathered(
    x_TD: torch.Tensor, rows_RD: torch.Tensor, dest_row_TK: torch.Tensor
) -> torch.Tensor:
    """`rows_RD` (copied from x_TD.detach() by `scatter_rows` with `routing_metadata`'s
    rows) as if `permute` had made it: gradients flow back to x_TD."""
    return _Gathered.apply(x_TD, dest_row_TK, [rows_RD])


def permute_with_weights(
    x_TD: torch.Tensor, w_TK: torch.Tensor, dest_row_TK: torch.Tensor, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`permute`, and each row's combine weight (w_R[dest_row_TK[t, k]] = w_TK[t, k]) from
    the same kernel; differentiable in x_TD and w_TK."""
    return _PermuteWithWeights.apply(x_TD, w_TK, n_rows, dest_row_TK)


def permute(x_TD: torch.Tensor, dest_row_TK: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Copy each kept (token, k) row of x_TD into the expert-grouped buffer [n_rows, D].

    `dest_row_TK` comes from `routing_metadata`; n_rows is the kept count (every row
    below it is some assignment's). Only `dest_row_TK` is kept for backward.
    """
    return _Permute.apply(x_TD, n_rows, dest_row_TK)
