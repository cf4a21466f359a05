"""Host time per call of each kernel wrapper and of the MoE layer: what the CPU spends to
queue the work, not what the GPU spends running it.

A layer whose kernels are short is host-bound: the GPU waits between kernels while
Python issues the next one (the idle gaps of `moe_layer.py --profile`). Here every call
runs at a small shape (the GPU finishes each kernel long before the next is queued), N
calls back to back without a sync, and the host's wall time per call is reported; then
one sync, outside the timing. A bare aten op and an empty Triton kernel (raw `triton.jit`
and through `xmoe.kernels.backend.Kernel`) are the yardsticks.

  python benchmarks/host_overhead.py --out benchmarks/results/host_overhead.json
  python benchmarks/host_overhead.py --device cpu --out /tmp/h.json    # smoke test (torch paths)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_name, sync  # noqa: E402
from xmoe.kernels.backend import HAVE_TRITON, kernel  # noqa: E402
from xmoe.train.loop import setup_frozen  # noqa: E402

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _empty_raw(x_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n), mask=i < n)

    @kernel
    def _empty_wrapped(x_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n), mask=i < n)


def per_call_us(fn, dev: torch.device, calls: int) -> float:
    """Host microseconds per call of `fn`, `calls` of them queued back to back."""
    for _ in range(5):
        fn()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    sync(dev)
    return 1e6 * host / calls


def cases(dev: torch.device, dtype: torch.dtype) -> dict:
    """name -> a no-argument call at a small shape."""
    from xmoe.config import load_config
    from xmoe.kernels.activation import scaled_act_fwd
    from xmoe.kernels.grouped_gemm import grouped_mm
    from xmoe.kernels.permute import scatter_rows, unpermute
    from xmoe.kernels.router_topk import softmax_topk
    from xmoe.kernels.routing import routing_metadata
    from xmoe.moe.layer import MoELayer
    from xmoe.parallel.groups import create_parallel_state

    T, D, E, K, F = 256, 256, 64, 6, 128
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(T, D, generator=g).to(dev, dtype)
    logits = torch.randn(T, E, generator=g).to(dev)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(dev)
    meta = routing_metadata(ids, None, E)
    rows = scatter_rows(x, meta.dest_row_TK, T * K)
    h = torch.randn(T * K, F, generator=g).to(dev, dtype)
    w_R = torch.rand(T * K, generator=g).to(dev, dtype)
    w1 = torch.randn(E, F, D, generator=g).to(dev, dtype)
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    buf = torch.zeros(1024, device=dev)

    cfg = load_config(
        "small",
        [
            "model.hidden=256",
            "moe.num_experts=64",
            "moe.expert_hidden=128",
            "moe.capacity_factor=null",
            "parallel.ep=1",
        ],
    )
    ps = create_parallel_state(cfg, 0, 1, device=dev)
    layer = MoELayer(cfg, ps).to(dev, dtype)
    xl = x.clone().requires_grad_()
    gy = torch.randn_like(x)

    def layer_fwd_bwd():
        layer(xl).backward(gy)

    out = {
        "aten add_ (yardstick)": lambda: buf.add_(1.0),
        "routing_metadata": lambda: routing_metadata(ids, None, E),
        "scatter_rows (permute)": lambda: scatter_rows(x, meta.dest_row_TK, T * K),
        "unpermute (combine sum)": lambda: unpermute(rows, meta.dest_row_TK),
        "scaled_act_fwd": lambda: scaled_act_fwd(h, None, w_R),
        "softmax_topk fwd": lambda: softmax_topk(logits, K, True),
        "grouped_mm fwd (torch path)": lambda: grouped_mm(rows, w1.transpose(1, 2), counts, "auto"),
        "MoE layer fwd": lambda: layer(x),
        "MoE layer fwd+bwd": layer_fwd_bwd,
    }
    if HAVE_TRITON and dev.type == "cuda":
        grid = (triton.cdiv(1024, 256),)
        out = {
            "empty triton.jit kernel": lambda: _empty_raw[grid](buf, 1024, BLOCK=256),
            "empty kernel via backend.Kernel": lambda: _empty_wrapped[grid](buf, 1024, BLOCK=256),
            **out,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu for a smoke test", file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    results = []
    with setup_frozen():
        for name, fn in cases(dev, dtype).items():
            us = per_call_us(fn, dev, args.calls)
            results.append({"case": name, "host_us_per_call": round(us, 1)})
            print(f"{us:9.1f} us  {name}", flush=True)
            gc.collect()
    cmd = " ".join(["python", "benchmarks/host_overhead.py", *sys.argv[1:]])
    doc = {"machine": machine_name(dev, 1), "command": cmd, "cases": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
