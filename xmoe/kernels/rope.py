"""Rotary embedding of q and k straight out of the fused QKV projection, one kernel each way.

  qkv_BS3HE (the projection's output viewed [B, S, 3, H, Dh])
    -> q, k rotated by position: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), with x1,
       x2 the first and second half of each head's channels, in fp32, rounded once;
    -> v copied beside them,
  as three [B, S, H, Dh] buffers (attention takes them transposed to [B, H, S, Dh]).
Backward rotates the q and k gradients back (by -angle) and writes all three into one
[B, S, 3, H, Dh] gradient, so nothing is accumulated. Nothing is kept for backward but the
cos/sin tables. Copying v costs one write of it, and lets the projection's output be freed
(attention keeps v, which as a view kept all of qkv alive). The unfused version ran an
fp32 copy, four multiplies, two adds, a concatenation and a cast each way.
"""

from __future__ import annotations

import torch

from xmoe.kernels.backend import HAVE_TRITON, acc_dtype, kernel, next_pow2, use_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @kernel
    def _rope_fwd_kernel(
        qkv_ptr,
        q_ptr,
        k_ptr,
        v_ptr,
        cos_ptr,
        sin_ptr,
        S,
        H,
        HALF,
        BLOCK_H: tl.constexpr,
        BLOCK_F: tl.constexpr,
    ):
        tok = tl.program_id(0).to(tl.int64)  # b * S + s
        s = tok % S
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        f = tl.arange(0, BLOCK_F)
        m = (h < H)[:, None] & (f < HALF)[None, :]
        E = 2 * HALF
        cos = tl.load(cos_ptr + s * HALF + f, mask=f < HALF, other=0.0)[None, :]
        sin = tl.load(sin_ptr + s * HALF + f, mask=f < HALF, other=0.0)[None, :]
        row = h[:, None] * E + f[None, :]  # offset inside one of q, k, v of this token
        src = qkv_ptr + tok * 3 * H * E + row
        dst = tok * H * E + row
        for j in tl.static_range(2):
            x1 = tl.load(src + j * H * E, mask=m, other=0.0).to(tl.float32)
            x2 = tl.load(src + j * H * E + HALF, mask=m, other=0.0).to(tl.float32)
            out = q_ptr if j == 0 else k_ptr
            tl.store(out + dst, (x1 * cos - x2 * sin).to(out.dtype.element_ty), mask=m)
            tl.store(out + dst + HALF, (x2 * cos + x1 * sin).to(out.dtype.element_ty), mask=m)
        v1 = tl.load(src + 2 * H * E, mask=m, other=0.0)
        v2 = tl.load(src + 2 * H * E + HALF, mask=m, other=0.0)
        tl.store(v_ptr + dst, v1, mask=m)
        tl.store(v_ptr + dst + HALF, v2, mask=m)

    @kernel
    def _rope_bwd_kernel(
        dq_ptr,
        dk_ptr,
        dv_ptr,
        dqkv_ptr,
        cos_ptr,
        sin_ptr,
        S,
        H,
        HALF,
        sq_b,
        sq_s,
        sq_h,
        sk_b,
        sk_s,
        sk_h,
        sv_b,
        sv_s,
        sv_h,
        BLOCK_H: tl.constexpr,
        BLOCK_F: tl.constexpr,
    ):
        tok = tl.program_id(0).to(tl.int64)
        b = tok // S
        s = tok % S
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        f = tl.arange(0, BLOCK_F)
        m = (h < H)[:, None] & (f < HALF)[None, :]
        E = 2 * HALF
        cos = tl.load(cos_ptr + s * HALF + f, mask=f < HALF, other=0.0)[None, :]
        sin = tl.load(sin_ptr + s * HALF + f, mask=f < HALF, other=0.0)[None, :]
        dst = dqkv_ptr + tok * 3 * H * E + h[:, None] * E + f[None, :]
        for j in tl.static_range(2):
            if j == 0:
                g = dq_ptr + b * sq_b + s * sq_s + h[:, None] * sq_h + f[None, :]
            else:
                g = dk_ptr + b * sk_b + s * sk_s + h[:, None] * sk_h + f[None, :]
            g1 = tl.load(g, mask=m, other=0.0).to(tl.float32)
            g2 = tl.load(g + HALF, mask=m, other=0.0).to(tl.float32)
            ty = dqkv_ptr.dtype.element_ty
            tl.store(dst + j * H * E, (g1 * cos + g2 * sin).to(ty), mask=m)
            tl.store(dst + j * H * E + HALF, (g2 * cos - g1 * sin).to(ty), mask=m)
        gv = dv_ptr + b * sv_b + s * sv_s + h[:, None] * sv_h + f[None, :]
        tl.store(dst + 2 * H * E, tl.load(gv, mask=m, other=0.0), mask=m)
        tl.store(dst + 2 * H * E + HALF, tl.load(gv + HALF, mask=m, other=0.0), mask=m)


def rope_qkv_torch(qkv_BS3HE: torch.Tensor, cos_SF: torch.Tensor, sin_SF: torch.Tensor):
    """Reference (differentiable through plain torch ops): q, k rotated and v, [B, S, H, Dh]."""
    acc = acc_dtype(qkv_BS3HE.dtype)
    cos, sin = cos_SF[:, None, :].to(acc), sin_SF[:, None, :].to(acc)  # [S, 1, Dh/2]
    outs = []
    for j in range(2):
        x1, x2 = qkv_BS3HE[:, :, j].to(acc).chunk(2, dim=-1)
        rot = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        outs.append(rot.to(qkv_BS3HE.dtype))
    return outs[0], outs[1], qkv_BS3HE[:, :, 2].contiguous()


def _blocks(H: int, half: int) -> tuple[int, int]:
    block_f = max(1, next_pow2(half))
    return max(1, min(next_pow2(H), 2048 // block_f)), block_f


class _RopeQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv_BS3HE, cos_SF, sin_SF):
        B, S, _, H, E = qkv_BS3HE.shape
        qkv = qkv_BS3HE.contiguous()
        q, k, v = (torch.empty(B, S, H, E, dtype=qkv.dtype, device=qkv.device) for _ in range(3))
        ctx.save_for_backward(cos_SF, sin_SF)
        if B * S * H * E == 0:
            return q, k, v
        bh, bf = _blocks(H, E // 2)
        _rope_fwd_kernel[(B * S, triton.cdiv(H, bh))](
            qkv, q, k, v, cos_SF, sin_SF, S, H, E // 2, BLOCK_H=bh, BLOCK_F=bf
        )
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos_SF, sin_SF = ctx.saved_tensors
        ref = next(g for g in (dq, dk, dv) if g is not None)
        B, S, H, E = ref.shape

        def usable(g):  # any strides but a unit last one; a missing gradient is zero
            if g is None:
                return torch.zeros_like(ref)
            return g if g.stride(-1) == 1 else g.contiguous()

        dq, dk, dv = usable(dq), usable(dk), usable(dv)
        dqkv = torch.empty(B, S, 3, H, E, dtype=ref.dtype, device=ref.device)
        if B * S * H * E == 0:
            return dqkv, None, None
        bh, bf = _blocks(H, E // 2)
        _rope_bwd_kernel[(B * S, triton.cdiv(H, bh))](
            dq, dk, dv, dqkv, cos_SF, sin_SF, S, H, E // 2,
            dq.stride(0), dq.stride(1), dq.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            BLOCK_H=bh, BLOCK_F=bf,
        )  # fmt: skip
        return dqkv, None, None


def rope_qkv(
    qkv_BS3HE: torch.Tensor, cos_SF: torch.Tensor, sin_SF: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q and k rotated by RoPE, and v, each [B, S, H, Dh], from the QKV projection's output
    viewed [B, S, 3, H, Dh]; cos/sin tables [S, Dh/2] (fp32)."""
    if qkv_BS3HE.shape[-1] % 2:
        raise ValueError(f"rope_qkv: head dim {qkv_BS3HE.shape[-1]} must be even")
    if not use_triton(qkv_BS3HE):
        return rope_qkv_torch(qkv_BS3HE, cos_SF, sin_SF)
    return _RopeQKV.apply(qkv_BS3HE, cos_SF.contiguous(), sin_SF.contiguous())
