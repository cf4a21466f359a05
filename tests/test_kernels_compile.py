"""Every Triton kernel compiles for the GPUs we run on: H200 (sm_90), A100 (sm_80) and
Frontier's MI250X (gfx90a), with the dtypes and block sizes the GPU launches use.

The other kernel tests run the kernels in Triton's CPU interpreter, which never compiles
them; a kernel the interpreter accepts can still fail to compile for a GPU. Triton
compiles without a GPU, so this records each launch of the wrappers (bf16 inputs at the
small preset's widths, under the interpreter) and compiles it for each target.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton_interp

import xmoe.kernels as kernels_pkg
from xmoe.kernels import backend

test_in_interpreter_process = triton_interp.child_process_test(__file__)

TARGETS = {"sm_90": ("cuda", 90, 32), "sm_80": ("cuda", 80, 32), "gfx90a": ("hip", "gfx90a", 64)}
DTYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.uint8: "u8",
    torch.bool: "i1",
}


def _all_kernels() -> dict[str, backend.Kernel]:
    """Every `backend.Kernel` defined in a module of `xmoe.kernels`, by "module.name"."""
    out = {}
    for info in pkgutil.iter_modules(kernels_pkg.__path__):
        mod = importlib.import_module(f"xmoe.kernels.{info.name}")
        for k, v in vars(mod).items():
            if isinstance(v, backend.Kernel) and v.fn.__module__ == mod.__name__:
                out[f"{info.name}.{k}"] = v
    return out


def _exercise_wrappers() -> None:
    """Each wrapper once or twice, as the trainer calls it: bf16, small preset's widths."""
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
    from xmoe.kernels.grouped_gemm import grouped_mm
    from xmoe.model.transformer import rope_tables

    bf = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    T, K, E, D, F = 8, 6, 64, 2048, 1408
    ids = torch.rand(T, E, generator=g).topk(K, 1).indices
    keep = torch.rand(T, K, generator=g) > 0.3
    for kp in (None, keep):
        meta = routing.routing_metadata(ids, kp, E)
    R = T * K
    x = torch.randn(T, D, generator=g).to(bf)
    w_TK = torch.rand(T, K, generator=g).to(bf)
    slot = meta.src_slot_N
    permute.gather_rows(x, slot, K)
    permute.gather_rows(x, slot, K, w_TK.reshape(-1))
    permute.scatter_rows(x, meta.dest_row_TK, R)
    permute.scatter_rows(x, meta.dest_row_TK, R, w_TK)
    permute.scatter_rows(x, meta.dest_row_TK, R, w_TK, weights_out=True)
    rows = torch.randn(R, D, generator=g).to(bf)
    permute.unpermute(rows, meta.dest_row_TK)
    permute.unpermute(rows, meta.dest_row_TK, w_TK)
    combine.row_dot(x, rows, meta.dest_row_TK)
    h = torch.randn(R, F, generator=g).to(bf)
    wr = torch.rand(R, generator=g).to(bf)
    for h3 in (None, h):
        activation.scaled_act_fwd(h, h3, wr)
        activation.scaled_act_bwd(h, h3, wr, h)
    xn = torch.randn(T, D, generator=g).to(bf).requires_grad_()
    rmsnorm.rms_norm(xn, torch.ones(D, dtype=bf), 1e-6).sum().backward()
    qkv = torch.randn(1, 4, 3, 16, 128, generator=g).to(bf).requires_grad_()
    cos, sin = rope_tables(4, 128, 10000.0, torch.device("cpu"))
    sum(t.float().sum() for t in rope.rope_qkv(qkv, cos, sin)).backward()
    lg = torch.randn(T, E, generator=g).requires_grad_()
    for wdt in (torch.float32, bf):  # the weights as the router takes them, and fp32
        top = router_topk.softmax_topk(lg, K, True, wdt)
        (top.weights_TK.float().sum() + top.probs_sum_E.sum() + top.lse_sq_sum).backward()
        lg.grad = None
    top = router_topk.softmax_topk(lg, K, True)
    top.weights_TK.sum().backward()  # no gradient into the sums
    # the grouped GEMM and the loss take their GPU tiles in `_gpu_settings`: small sizes
    # keep the interpreter quick
    xr = torch.randn(12, 32, generator=g).to(bf).requires_grad_()
    w1 = torch.randn(3, 48, 32, generator=g).to(bf).requires_grad_()
    grouped_mm(xr, w1.transpose(1, 2), [5, 0, 7], "triton").float().sum().backward()
    cross_entropy.ce_rows(torch.randn(2, 100, generator=g).to(bf), ids[:2, 0], 0.5)


def _gpu_settings(key: str, constexprs: dict, options: dict, vendor: str):
    """The launch settings that depend on the device, as the wrappers pick them on a GPU
    (the interpreter takes smaller ones)."""
    if key.startswith("grouped_gemm_triton."):
        from xmoe.kernels import grouped_gemm_triton

        hip, torch.version.hip = torch.version.hip, ("6.0" if vendor == "hip" else None)
        try:
            bm, bn, bk, warps, stages = grouped_gemm_triton.config(torch.bfloat16, False)
        finally:
            torch.version.hip = hip
        tiles = {"BM": bm, "BN": bn, "BK" if "BK" in constexprs else "BR": bk}
        constexprs = {**constexprs, **tiles}
        options = {"num_warps": warps, "num_stages": stages}
    elif key.startswith("activation._scaled_act_"):
        from xmoe.kernels.activation import act_config

        fwd, bwd = act_config(1408, True)  # the small preset's expert width
        rows, block_f, warps = fwd if "_fwd_" in key else bwd
        constexprs = {**constexprs, "BLOCK_R": rows, "BLOCK_F": block_f}
        options = {"num_warps": warps}
    elif key in ("permute._scatter_rows_kernel", "permute._unpermute_kernel"):
        from xmoe.kernels.permute import _token_tiles

        tokens, block_d, warps = _token_tiles(2048, True)  # the small preset's hidden size
        constexprs = {**constexprs, "BLOCK_T": tokens, "BLOCK_D": block_d}
        options = {"num_warps": warps}
    elif key == "cross_entropy._ce_rows_kernel":
        from xmoe.kernels.cross_entropy import ce_config

        block, warps = ce_config(True)
        constexprs = {**constexprs, "BLOCK_V": block}
        options = {"num_warps": warps}
    return constexprs, options


def _specs() -> dict[tuple, tuple]:
    """(kernel key, signature, constexprs, options) of every recorded launch, deduplicated."""
    import inspect

    names = {id(v): k for k, v in _all_kernels().items()}
    with backend.record_launches() as launches:
        _exercise_wrappers()
    specs = {}
    for kern, args, kwargs in launches:
        params = list(inspect.signature(kern.fn).parameters.values())
        bound = dict(zip([p.name for p in params], args))
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound.update(kwargs)
        signature, constexprs = {}, {}
        for p in params:
            v = bound[p.name]
            if "constexpr" in str(p.annotation) or v is None:
                signature[p.name], constexprs[p.name] = "constexpr", v
            elif torch.is_tensor(v):
                signature[p.name] = "*" + DTYPES[v.dtype]
            elif isinstance(v, bool):
                signature[p.name] = "i1"
            elif isinstance(v, int):
                signature[p.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            else:
                signature[p.name] = "fp32"
        key = names[id(kern)]
        variants = [constexprs]
        if "EVEN_K" in constexprs:  # the preset's K divides the tiles, not every N does
            variants = [
                {**constexprs, "EVEN_K": ek, "EVEN_N": en}
                for ek in (True, False)
                for en in (True, False)
            ]
        for cx in variants:
            frozen = (key, tuple(signature.items()), tuple(sorted(cx.items())))
            specs[frozen] = (kern, signature, cx, options)
    return specs


def _compile(specs: list[dict], tmp_path) -> subprocess.CompletedProcess:
    """Compile in a fresh process: this one imported Triton for its interpreter."""
    path = tmp_path / "specs.json"
    path.write_text(json.dumps(specs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_kernels.py")
    return subprocess.run(
        [sys.executable, str(script), str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_every_kernel_compiles_for_each_gpu_target(interpreter, tmp_path):
    specs = _specs()
    seen = {key for key, _, _ in specs}
    assert seen == set(_all_kernels()), f"not exercised: {set(_all_kernels()) - seen}"
    jobs = []
    for (key, _, _), (_, signature, constexprs, options) in specs.items():
        for vendor, arch, warp in TARGETS.values():
            cx, opts = _gpu_settings(key, constexprs, options, vendor)
            module, name = key.split(".", 1)
            jobs.append(
                {
                    "module": f"xmoe.kernels.{module}",
                    "name": name,
                    "signature": signature,
                    "constexprs": cx,
                    "options": opts,
                    "target": [vendor, arch, warp],
                }
            )
    proc = _compile(jobs, tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("target", list(TARGETS))
def test_a_broken_kernel_does_not_compile(interpreter, tmp_path, target):
    """The check can fail: `compile_kernels.broken` (not valid Triton for any GPU) is
    reported for each target."""
    spec = {
        "module": "compile_kernels",
        "name": "broken",
        "signature": {"x_ptr": "*bf16", "BLOCK": "constexpr"},
        "constexprs": {"BLOCK": 64},
        "options": {},
        "target": list(TARGETS[target]),
    }
    proc = _compile([spec], tmp_path)
    assert proc.returncode == 1 and "compile_kernels.broken for" in proc.stdout, proc.stdout


def test_row_counts_are_not_specialised():
    """Row counts change from call to call under expert parallelism; a kernel specialised
    on them compiles a new variant mid-training (a stall of a second per variant, seen on
    H200). Each kernel taking a count of rows names it in `rows`, and the compiled
    function is told not to specialise exactly those arguments."""
    import inspect

    from triton.runtime.jit import JITFunction

    counts = {"R", "T", "N", "NB"}  # the kernels' names for rows, tokens, assignments, blocks
    for key, kern in _all_kernels().items():
        names = list(inspect.signature(kern.fn).parameters)
        rows = set(kern.do_not_specialize)
        assert rows <= set(names), f"{key}: rows={sorted(rows)} are not its arguments"
        if key.startswith(("permute.", "routing.", "activation.", "combine.")):
            assert rows == counts & set(names), f"{key}: rows={sorted(rows)}"
        jit = JITFunction(kern.fn, do_not_specialize=kern.do_not_specialize)
        assert {p.name for p in jit.params if p.do_not_specialize} == rows, key
