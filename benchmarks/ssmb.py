"""SSMB against plain TP: memory and step time of one MoE transformer block per TP size.

One block (RMSNorm, attention, RMSNorm, MoE) of the small or medium preset's shape, with
the preset's routing (PFT, capacity factor 1.25, GELU experts), bf16, forward + backward.
Every TP size sees the same global tokens: a TP group of `tp` GPUs shares one micro-batch
of `--tokens` tokens. TP ranks are the expert-parallel ranks (EP = TP; experts are not
split by TP). Modes:

  ssmb   the MoE block routes this TP rank's 1/tp of the tokens (sequence-parallel region)
  plain  every TP rank runs the MoE block on the full sequence (all-gather in, slice out)

Per case (max over the TP group's ranks): `block_ms` median step time of the block;
`block_act_gib` memory held for backward after the block's forward and `block_peak_gib`
the peak above parameters + gradients during forward + backward; `block_saved_gib` the
distinct tensors autograd saves for backward (counted by a saved-tensor hook: measurable on
CPU too); the same four for the MoE block alone (`moe_*`, its input already in the
sequence-parallel layout). `moe_act_vs_ideal` = moe_act / (moe_act at TP = 1 / tp) with
the allocator's numbers on GPUs and the saved-tensor bytes on CPU; the goal is <= 1.10.
Under torchrun with W processes the TP sizes 1, 2, 4 that fit W run one after the other
(ranks outside the case's TP group wait).

  torchrun --nproc_per_node 4 benchmarks/ssmb.py --out benchmarks/results/ssmb.json
  torchrun --nproc_per_node 2 benchmarks/ssmb.py --device cpu --tiny --out /tmp/ssmb.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xmoe.config import load_config  # noqa: E402
from xmoe.model.transformer import Block  # noqa: E402
from xmoe.parallel.groups import create_parallel_state  # noqa: E402
from xmoe.parallel.tensor_parallel import TPGroup, sum_grads_over_tp  # noqa: E402

GIB = 2**30


def init(device: str) -> tuple[int, int, torch.device]:
    """(rank, world, device) from torchrun's environment; one process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)  # before the process group, or NCCL can hang
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        if world == 1:
            dist.init_process_group(
                "gloo" if device == "cpu" else "nccl", store=dist.HashStore(), rank=0, world_size=1
            )
        else:
            dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return rank, world, dev


def allocated(dev: torch.device) -> int:
    return torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def saved_bytes(fwd, params: set[int]):
    """Run `fwd`, counting the bytes of the distinct tensors autograd keeps for backward
    (parameters excluded): activation memory on any device, CPU included."""
    storages: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fwd()
    return y, sum(storages.values())


def measure(module, x, gy, seq_len: int | None, dev, warmup: int, iters: int) -> dict:
    """Median step time (ms) and memory (GiB) above parameters + gradients of fwd + bwd."""

    def fwd():
        return module(x, seq_len) if seq_len is not None else module(x)

    for _ in range(warmup):  # also allocates every gradient, so the base below includes them
        fwd().backward(gy)
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    base = allocated(dev)
    y, saved = saved_bytes(fwd, {p.untyped_storage().data_ptr() for p in module.parameters()})
    act = allocated(dev) - base
    y.backward(gy)
    del y
    sync(dev)
    peak = (torch.cuda.max_memory_allocated(dev) - base) if dev.type == "cuda" else 0
    times = []
    for _ in range(iters):
        sync(dev)
        t0 = time.perf_counter()
        fwd().backward(gy)
        sync(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    return {
        "ms": statistics.median(times),
        "saved_gib": saved / GIB,
        "act_gib": act / GIB,
        "peak_gib": peak / GIB,
    }


def max_over(values: dict, group, dev) -> dict:
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return dict(zip(keys, t.tolist()))


def run_case(args, shape: str, tp: int, mode: str, rank: int, dev) -> dict | None:
    preset = "tiny" if args.tiny else shape
    seq = load_config(preset).model.seq_len
    micro = max(1, args.tokens // seq)
    overrides = [f"parallel.tp={tp}", f"parallel.ep={tp}", f"parallel.ssmb={mode == 'ssmb'}"]
    overrides += [f"train.micro_batch={micro}", "moe.dispatcher=pft"]
    if args.dropless:
        overrides.append("moe.capacity_factor=null")
    cfg = load_config(preset, overrides)
    # group creation is collective over every process, members of this case or not
    state = create_parallel_state(cfg, rank, tp, device=dev)
    if tp == 1 and dist.get_world_size() > 1:
        # one rank alone: its groups must not default to the whole world
        alone = [dist.new_group([r]) for r in range(dist.get_world_size())][rank]
        kinds = ("tp", "dp", "ep", "expert_dp", "node_local", "cross_node")
        state.groups = {kind: alone for kind in kinds}
    if rank >= tp:
        return None
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    block = Block(cfg, cfg.model.dense_layers, state).to(dev, dtype)
    tpg = TPGroup.from_state(state)
    if tpg is not None:
        sum_grads_over_tp(block, tpg)  # the replicated weights' TP all-reduce, as in training
    D, T = cfg.model.hidden, micro * seq
    shape_x = (micro, seq, D) if tp == 1 else (T // tp, D)
    g = torch.Generator(device=dev).manual_seed(1 + rank)
    x = torch.randn(shape_x, generator=g, device=dev, dtype=dtype).requires_grad_()
    gy = torch.randn(shape_x, generator=g, device=dev, dtype=dtype)
    res = {}
    for name, module, seq_len in (
        ("block", block, seq if tp > 1 else None),
        ("moe", block.ffn, None),
    ):
        xm = x if name == "block" or tp > 1 else x.view(T, D).detach().requires_grad_()
        gm = gy if name == "block" or tp > 1 else gy.view(T, D)
        for k, v in measure(module, xm, gm, seq_len, dev, args.warmup, args.iters).items():
            res[f"{name}_{k}"] = v
    params = sum(p.numel() * p.element_size() for p in block.parameters())
    res["weights_gib"] = params / GIB
    res = max_over(res, state.tp_group, dev) if tp > 1 else res
    del block, x, gy
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    m, e = cfg.model, cfg.moe
    return {
        "shape": shape if not args.tiny else "tiny",
        "tp": tp,
        "ep": tp,
        "mode": mode,
        "global_tokens": T,
        "moe_tokens_per_rank": T // tp if mode == "ssmb" else T,
        "hidden": m.hidden,
        "heads": m.heads,
        "experts": e.num_experts,
        "top_k": e.top_k,
        "expert_hidden": e.expert_hidden,
        "capacity_factor": e.capacity_factor,
        "dtype": str(dtype).replace("torch.", ""),
        **{k: round(v, 4) for k, v in res.items()},
    }


def add_ratios(cases: list[dict]) -> None:
    base = {c["shape"]: c for c in cases if c["tp"] == 1}
    for c in cases:
        one = base.get(c["shape"])
        key = "act_gib" if one and one["moe_act_gib"] else "saved_gib"
        if one is None or not one[f"moe_{key}"]:
            c["moe_act_vs_ideal"] = c["block_act_vs_tp1"] = None
            continue
        c["moe_act_vs_ideal"] = round(c[f"moe_{key}"] / (one[f"moe_{key}"] / c["tp"]), 3)
        c["block_act_vs_tp1"] = round(c[f"block_{key}"] / one[f"block_{key}"], 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny preset's shape (smoke test)")
    ap.add_argument("--shapes", default="small,medium")
    ap.add_argument(
        "--tp", default="1,2,4", help="TP sizes; those above the world size are skipped"
    )
    ap.add_argument("--tokens", type=int, default=16384, help="global tokens per TP group")
    ap.add_argument("--dropless", action="store_true", help="dropless routing instead of cf 1.25")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.tiny:
        args.shapes, args.tokens = "tiny", min(args.tokens, 1024)
    rank, world, dev = init(args.device)
    tps = [t for t in (int(v) for v in args.tp.split(",")) if t <= world]
    cases = []
    for shape in args.shapes.split(","):
        for tp in tps:
            for mode in ("ssmb", "plain") if tp > 1 else ("ssmb",):
                case = run_case(args, shape, tp, mode, rank, dev)
                dist.barrier()
                if rank == 0:
                    cases.append(case)
                    print(json.dumps(case), flush=True)
    if rank == 0:
        add_ratios(cases)
        cols = ("block_ms", "block_act_gib", "block_saved_gib", "moe_ms", "moe_act_gib")
        cols += ("moe_saved_gib", "moe_peak_gib", "moe_act_vs_ideal")
        print(f"{'shape':8} {'tp':>2} {'mode':6} " + " ".join(f"{c:>16}" for c in cols))
        for c in cases:
            values = " ".join(f"{float(c[k] or 'nan'):16.4f}" for k in cols)
            print(f"{c['shape']:8} {c['tp']:>2} {c['mode']:6} {values}")
        if args.out:
            name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
            doc = {
                "benchmark": "ssmb",
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": f"{world}x {name or 'CPU'}, torch {torch.__version__}",
                "command": f"torchrun --nproc_per_node {world} " + shlex.join(sys.argv),
                "cases": cases,
            }
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
