"""Every Triton kernel against its torch reference on the GPU, at the small preset's sizes.

`python benchmarks/moe_layer.py --check ...` runs these first: the CPU tests check the
kernels under Triton's interpreter in fp32, which computes bf16 wrongly, so this is where
the bf16 GPU code paths meet their references. On a CPU the comparisons fall back to the
references themselves (a smoke test of the script).
"""

from __future__ import annotations

import torch

from xmoe.kernels import (
    activation,
    combine,
    cross_entropy,
    permute,
    rmsnorm,
    rope,
    router_topk,
    routing,
)
from xmoe.kernels.grouped_gemm import grouped_mm, torch_grouped_mm_supported
from xmoe.model.transformer import rope_tables
from xmoe.moe.router import router_logits


def check_kernels(dev) -> None:
    """Every Triton kernel on `dev` against its torch reference; raises on a mismatch."""
    g = torch.Generator(device="cpu").manual_seed(0)
    T, K, E, D = 4099, 6, 64, 256
    ids = torch.rand(T, E, generator=g).topk(K, 1).indices.to(dev)
    keep = (torch.rand(T, K, generator=g) > 0.2).to(dev)
    for kp in (None, keep):
        a = routing.routing_metadata(ids, kp, E)
        b = routing.routing_metadata_torch(ids, kp, E)
        R = int(b.counts_E.sum())
        assert torch.equal(a.counts_E, b.counts_E) and torch.equal(a.dest_row_TK, b.dest_row_TK)
        assert torch.equal(a.src_slot_N[:R], b.src_slot_N[:R])
    x = torch.randn(T, D, generator=g).to(dev)
    w = torch.rand(T, K, generator=g).to(dev)
    rows = torch.randn(R, D, generator=g).to(dev)
    slot = b.src_slot_N[:R]
    pairs = [
        (
            permute.gather_rows(x, slot, K, w.reshape(-1)),
            permute.gather_rows_torch(x, slot, K, w.reshape(-1)),
        ),
        (
            permute.scatter_rows(x, b.dest_row_TK, R, w),
            permute.gather_rows_torch(x, slot, K, w.reshape(-1)),
        ),
        (
            permute.unpermute(rows, b.dest_row_TK, w),
            permute.unpermute_torch(rows, b.dest_row_TK, w),
        ),
        (combine.row_dot(x, rows, b.dest_row_TK), combine.row_dot_torch(x, rows, b.dest_row_TK)),
    ]
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the activation with the combine weights folded in, bf16 as the experts run it
    h = (2 * torch.randn(R, 1408, generator=g)).to(dev, torch.bfloat16)
    h3 = torch.randn(R, 1408, generator=g).to(dev, torch.bfloat16)
    wr = torch.rand(R, generator=g).to(dev, torch.bfloat16)
    gh = torch.randn(R, 1408, generator=g).to(dev, torch.bfloat16)
    for h3_ in (None, h3):
        got = [activation.scaled_act_fwd(h, h3_, wr), *activation.scaled_act_bwd(h, h3_, wr, gh)]
        want = [
            activation.scaled_act_fwd_torch(h, h3_, wr),
            *activation.scaled_act_bwd_torch(h, h3_, wr, gh),
        ]
        for u, v in zip(got, want):
            if v is not None:
                torch.testing.assert_close(u.float(), v.float(), rtol=2e-2, atol=2e-2)
    # fp32 GELU over its whole range, tails included (the fitted erfc and the GPU's exp)
    hf = torch.linspace(-13.0, 13.0, 26001).reshape(-1, 81)
    phi = 0.5 * torch.special.erfc(-hf.double() / 2**0.5)
    a = activation.scaled_act_fwd(hf.to(dev), None, torch.ones(hf.shape[0], device=dev))
    keep = hf.abs() >= 1e-3
    rel = ((a.cpu().double() / hf.double() - phi) / phi)[keep].abs().max().item()
    print(f"fp32 GELU: Phi's relative error {rel:.1e}")
    assert rel < 1e-4, rel
    # the fused router (softmax, top-k, loss sums) and its backward, fp32 logits
    lg = (2 * torch.randn(16384, 64, generator=g)).to(dev)
    gr = (torch.randn(16384, 6, generator=g).to(dev), torch.randn(64, generator=g).to(dev))
    res = []
    for fn in (router_topk.softmax_topk, router_topk.softmax_topk_torch):
        x = lg.clone().requires_grad_()
        top = fn(x, 6, True)
        ids, topp, wts, cnt = top.ids_TK, top.topk_probs_TK, top.weights_TK, top.counts_E
        psum, zsq = top.probs_sum_E, top.lse_sq_sum
        loss = (wts * gr[0]).sum() + (psum * gr[1]).sum() + zsq * 0.5
        res.append([ids, cnt, topp, wts, psum, zsq, torch.autograd.grad(loss, [x])[0]])
    # the GPU's exp may order a near-tie differently: compare rows that chose alike
    same = (res[0][0] == res[1][0]).all(1)
    assert same.float().mean() > 0.999, f"router: {int((~same).sum())} rows chose differently"
    assert (res[0][1] - res[1][1]).abs().sum() <= 2 * int((~same).sum()) * 6
    for i, (u, v) in enumerate(zip(res[0][2:], res[1][2:])):
        if i in (0, 1, 4):  # per-row outputs: selected probs, weights, logits' gradient
            u, v = u[same], v[same]
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)
    # the router's logits and their gradients, bf16 operands (no fp32 copy of x)
    xr = torch.randn(16384, 2048, generator=g).to(dev, torch.bfloat16).requires_grad_()
    wg = (torch.randn(64, 2048, generator=g) / 45).to(dev, torch.bfloat16).requires_grad_()
    gl = torch.randn(16384, 64, generator=g).to(dev)
    got = [router_logits(xr, wg), *torch.autograd.grad(router_logits(xr, wg), [xr, wg], gl)]
    xd, wd = xr.detach().double(), wg.detach().double()
    want = [xd @ wd.t(), gl.double() @ wd, gl.double().t() @ xd]
    for name, u, v in zip(("logits", "dx", "dw"), got, want):
        err = ((u.double() - v).norm() / v.norm()).item()
        print(f"router {name}: relative error {err:.2e}")
        assert err < (1e-5 if name == "logits" else 4e-3), (name, err)
    # the model's RMSNorm and RoPE kernels, bf16 at the small preset's widths
    xn = (3 * torch.randn(4099, 2048, generator=g)).to(dev, torch.bfloat16)
    wn = (1 + torch.randn(2048, generator=g)).to(dev, torch.bfloat16)
    gn = torch.randn(4099, 2048, generator=g).to(dev, torch.bfloat16)
    y, rstd = rmsnorm.rmsnorm_fwd(xn, wn, 1e-6)
    y_ref, rstd_ref = rmsnorm.rmsnorm_fwd_torch(xn, wn, 1e-6)
    got = [y, rstd, *rmsnorm.rmsnorm_bwd(gn, xn, wn, rstd_ref)]
    want = [y_ref, rstd_ref, *rmsnorm.rmsnorm_bwd_torch(gn, xn, wn, rstd_ref)]
    for u, v in zip(got, want):
        torch.testing.assert_close(u.float(), v.float(), rtol=2e-2, atol=2e-2)
    qkv = torch.randn(2, 512, 3, 16, 128, generator=g).to(dev, torch.bfloat16)
    cos, sin = rope_tables(512, 128, 10000.0, dev)
    gq = [torch.randn(2, 16, 512, 128, generator=g).to(dev, torch.bfloat16) for _ in range(3)]
    res = []
    for fn in (rope.rope_qkv, rope.rope_qkv_torch):
        x = qkv.clone().requires_grad_()
        outs = [t.transpose(1, 2) for t in fn(x, cos, sin)]  # as attention reads them
        res.append([*outs, torch.autograd.grad(outs, [x], gq)[0]])
    for u, v in zip(*res):
        torch.testing.assert_close(u.float(), v.float(), rtol=1e-2, atol=1e-2)
    # the fused LM loss at the small preset's vocabulary: one chunk's rows, in place
    lg = (4 * torch.randn(333, 50304, generator=g)).to(dev, torch.bfloat16)
    tg = torch.randint(0, 50304, (333,), generator=g).to(dev)
    got = cross_entropy.ce_rows(lg.clone(), tg, 1 / 333)
    want = cross_entropy.ce_rows_torch(lg, tg, 1 / 333)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1].float(), want[1].float(), rtol=2e-2, atol=1e-5)
    hd = torch.randn(1000, 2048, generator=g).to(dev, torch.bfloat16).requires_grad_()
    wv = (torch.randn(50304, 2048, generator=g) / 45).to(dev, torch.bfloat16).requires_grad_()
    tg = torch.randint(0, 50304, (1000,), generator=g).to(dev)
    res = []
    for fused in (True, False):
        if fused:
            loss = cross_entropy.linear_cross_entropy(hd, wv, tg, 1e-3, rows=384)
        else:
            loss = torch.nn.functional.cross_entropy((hd @ wv.t()).float(), tg)
        res.append([loss.float(), *(x.float() for x in torch.autograd.grad(loss, [hd, wv]))])
    for name, u, v in zip(("loss", "dh", "dW"), *res):
        err = ((u - v).norm() / v.norm()).item()
        print(f"fused LM loss {name}: relative error {err:.2e}")
        assert err < 2e-2, (name, err)
    counts = b.counts_E.tolist()
    for dtype, tol in ((torch.float32, 3e-2), (torch.bfloat16, 5e-2)):
        xr = torch.randn(R, D, generator=g).to(dev, dtype).requires_grad_()
        wt = (torch.randn(E, 192, D, generator=g) / 16).to(dev, dtype).requires_grad_()
        gy = torch.randn(R, 192, generator=g).to(dev, dtype)
        impls = ["triton"]
        if torch_grouped_mm_supported(xr, wt.transpose(1, 2)):
            impls.append("torch")  # our split backward: dw = xᵀ·dy on _grouped_mm
        outs = {}
        for impl in ["loop", *impls]:
            xr.grad = wt.grad = None
            y = grouped_mm(xr, wt.transpose(1, 2), counts, impl)
            y.backward(gy)
            outs[impl] = (y.float(), xr.grad.float(), wt.grad.float())
        for impl in impls:
            for name, u, v in zip(("y", "dx", "dw"), outs[impl], outs["loop"]):
                err = ((u - v).norm() / v.norm()).item()
                print(f"{impl} grouped GEMM {dtype} {name}: relative error {err:.2e}")
                assert err < tol, (impl, dtype, name, err)
    print("kernel checks passed", flush=True)
