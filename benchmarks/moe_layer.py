"""One MoE layer, forward + backward, every implementation side by side.

Shape of the small preset's layer: hidden 2048, 64 GELU experts x 1408, top-6, 16384
tokens per GPU, bf16, random inputs. Routing balanced, or skewed (Zipf-like expert
popularity: the same logit bias for every implementation, through the inputs and the
gate weights, so DeepSpeed's own gate skews alike). Implementations (`impl` in the JSON):

  pft                  our MoELayer with the PFT dispatcher (dropless), as configured by
                       default: under EP that includes moe.dedup_ep
  pft_plain            pft with moe.dedup_ep=false: one row per (token, k) crosses (EP > 1)
  pft_weighted_combine the same with moe.fold_combine_weights=false: the combine applies
                       the weights (and keeps the expert outputs), not the activation
  pft_recompute        pft with moe.recompute_permute=true: backward gathers the experts'
                       input rows again instead of keeping them (one GPU only)
  pft_graphed          pft with its forward and backward captured as CUDA graphs
                       (`torch.cuda.make_graphed_callables`; one GPU, dropless makes no
                       host sync there): the layer's time without the host's launches
  pft_overlap          pft with moe.overlap_ep=true: the own rows' experts run while the
                       other ranks' rows are exchanged (EP > 1 only)
  pft_dedup            pft with moe.dedup_ep=true (pft's default under EP): one row per
                       (token, destination rank) crosses; the receiver copies it to each
                       of its experts (EP > 1 only)
  pft_exact_slots      pft with moe.dedup_fixed_slots=false: the pilots' exchanges take the
                       exact counts, issued after the host sync (at EP = 2, pft's default
                       is a fixed slot per (token, rank), issued before it)
  pft_dedup_overlap    both: the own pilots' experts run beside the pilots' exchanges
  pft_shared           pft with two shared experts of the routed experts' width (the
                       DeepSeekMoE-16B layer: one GELU MLP of 2 x 1408 on every token)
  rbd_rank             the RBD dispatcher with every rank its own virtual node
                       (parallel.node_size=1): one row per (token, destination rank)
                       crosses, and the receiver copies it to each expert (EP > 1 only)
  padded               our GShard/DeepSpeed-style padded dispatcher, capacity factor 1.25
  deepspeed            deepspeed.moe.layer.MoE, capacity factor 1.25
  deepspeed_dropless   deepspeed.moe.layer.MoE, drop_tokens=False
  torch_native         straightforward torch: argsort, index gather, torch._grouped_mm x2,
                       index_add_
  ceiling              the two expert grouped GEMMs alone on pre-permuted rows of the
                       same sizes: torch._grouped_mm with torch's own autograd where it
                       runs (else our best kernel)
  torch_grouped_mm     the same GEMMs through our torch._grouped_mm path (its backward
                       split so the weight gradient comes first and frees the input)
  triton_grouped_gemm  the same GEMMs through our Triton grouped GEMM

Single process: every impl on one device. Under torchrun with W processes: EP = W for
pft, padded and the DeepSpeed layers (tokens per GPU unchanged), plus the achieved
all-to-all bandwidth of PFT's exchange against plain all_to_all_single of the same splits.
`ms` is the median step time (max over ranks) with a wait after every step, so it
includes the host's head start before the GPU has work; `ms_back_to_back` the time per
step of `--iters` steps queued back to back with one wait at the end (median of 3), the
steady state of a layer inside a training step; `peak_gib` the peak allocated memory
during the timed steps (parameters, gradients and activations; max over ranks). With
`--sustained S`, `ms_sustained` is the back-to-back time once the case has run back to
back for S more seconds (max over ranks), and `sm_mhz`, `power_w` the median clock and
power of rank 0's GPU during it: a GPU under a sustained load settles at its power limit
and lowers its clock, the more the denser its work, so a short back-to-back run flatters
GEMM-heavy code. At the end rank 0 prints a "goal:" line per routing and goal of the
issue (`goal_lines`); an EP run appended to a file holding the one-GPU pft case also
compares against that case.

  python benchmarks/moe_layer.py --out benchmarks/results/moe_layer.json
  torchrun --nproc_per_node 2 benchmarks/moe_layer.py --out ... --append
  python benchmarks/moe_layer.py --device cpu --tiny --out /tmp/moe.json    # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    init_distributed,
    machine_name,
    max_over_ranks,
    median,
    peak_gib,
    profile_gaps,
    reset_memory,
    time_back_to_back,
    time_step,
    time_sustained,
    write_results,
)
from benchmarks.kernel_checks import check_kernels  # noqa: E402
from xmoe.config import ConfigError, load_config  # noqa: E402
from xmoe.kernels.grouped_gemm import grouped_mm, torch_grouped_mm_supported  # noqa: E402
from xmoe.kernels.routing import routing_metadata  # noqa: E402
from xmoe.moe.layer import MoELayer  # noqa: E402
from xmoe.parallel.collectives import all_to_all_uneven, exchange_counts  # noqa: E402
from xmoe.parallel.groups import create_parallel_state  # noqa: E402
from xmoe.train.loop import setup_frozen  # noqa: E402

SINGLE = [
    "pft",
    "pft_weighted_combine",
    "pft_recompute",
    "pft_graphed",
    "pft_shared",
    "padded",
    "deepspeed",
    "deepspeed_dropless",
    "torch_native",
    "ceiling",
    "torch_grouped_mm",
    "triton_grouped_gemm",
]
EP_IMPLS = [
    "pft",
    "pft_exact_slots",
    "pft_plain",
    "pft_overlap",
    "pft_weighted_combine",
    "pft_shared",
    "padded",
    "deepspeed",
    "deepspeed_dropless",
]
SKEW_SCALE = 4.0  # size of the shared input component that carries the per-expert logit bias


def shape(args) -> dict:
    if args.tiny:
        return dict(hidden=64, experts=8, ffn=32, top_k=2, tokens=256)
    return dict(hidden=2048, experts=64, ffn=1408, top_k=6, tokens=args.tokens)


def layer_config(
    s: dict, dispatcher: str, cf: float | None, ep: int, gemm: str, extra: tuple[str, ...] = ()
):
    return load_config(
        "small",
        [
            f"model.hidden={s['hidden']}",
            f"moe.num_experts={s['experts']}",
            f"moe.expert_hidden={s['ffn']}",
            f"moe.top_k={s['top_k']}",
            "moe.num_shared_experts=0",
            "moe.activation=gelu",
            f"moe.dispatcher={dispatcher}",
            f"moe.capacity_factor={'null' if cf is None else cf}",
            f"parallel.ep={ep}",
            f"moe.grouped_gemm={gemm}",
            *extra,
        ],
    )


def gate_weight(s: dict, routing: str, dev, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Router weights [E, D] and the shared input direction u that carries the skew."""
    g = torch.Generator().manual_seed(7)
    E, D = s["experts"], s["hidden"]
    u = torch.randn(D, generator=g)
    u /= u.norm()
    w = torch.randn(E, D, generator=g) / math.sqrt(D)
    w -= (w @ u)[:, None] * u[None, :]  # balanced: no expert prefers the shared component
    if routing == "skewed":
        # logit bias log(1/rank^1.2), hot experts spread over the EP ranks
        rank = torch.randperm(E, generator=g).float() + 1
        w += (-1.2 * torch.log(rank))[:, None] * u[None, :] / SKEW_SCALE
    return w.to(dev, dtype), u.to(dev, dtype)


def inputs(s: dict, u: torch.Tensor, routing: str, rank: int, dev, dtype):
    g = torch.Generator(device="cpu").manual_seed(1000 + rank)
    x = torch.randn(s["tokens"], s["hidden"], generator=g).to(dev, dtype)
    x += SKEW_SCALE * u  # never zero; the same constant component in both routings
    gy = torch.randn(s["tokens"], s["hidden"], generator=g).to(dev, dtype)
    return x.requires_grad_(), gy


def build_layer(impl: str, s: dict, ps, dev, dtype, w_gate) -> MoELayer:
    dispatcher, cf, extra = {
        "pft": ("pft", None, ()),
        "pft_weighted_combine": ("pft", None, ("moe.fold_combine_weights=false",)),
        "pft_recompute": ("pft", None, ("moe.recompute_permute=true",)),
        "pft_graphed": ("pft", None, ()),
        "pft_overlap": ("pft", None, ("moe.overlap_ep=true",)),
        "pft_plain": ("pft", None, ("moe.dedup_ep=false",)),
        "pft_dedup": ("pft", None, ("moe.dedup_ep=true",)),
        "pft_dedup_overlap": ("pft", None, ("moe.dedup_ep=true", "moe.overlap_ep=true")),
        "pft_exact_slots": ("pft", None, ("moe.dedup_ep=true", "moe.dedup_fixed_slots=false")),
        "pft_shared": ("pft", None, ("moe.num_shared_experts=2",)),
        "rbd_rank": ("rbd", None, ("parallel.node_size=1",)),
        "padded": ("padded", 1.25, ()),
        "deepspeed": ("deepspeed", 1.25, ()),
        "deepspeed_dropless": ("deepspeed", None, ()),
        "torch_native": ("pft", None, ()),
    }[impl]
    cfg = layer_config(s, dispatcher, cf, ps.ep, "auto", extra)
    if impl == "rbd_rank":
        ps = rank_node_state(cfg, ps, dev)
    layer = MoELayer(cfg, ps).to(dev, dtype)
    with torch.no_grad():
        if dispatcher == "deepspeed":
            layer.dispatcher.moe.deepspeed_moe.gate.wg.weight.copy_(w_gate)
        else:
            layer.router.weight_ED.copy_(w_gate)
    return layer


_RANK_NODES: dict = {}


def rank_node_state(cfg, ps, dev):
    """The parallel state with every rank its own (virtual) node, made once: RBD over it
    sends one row per (token, destination rank) and expands to experts on arrival."""
    if "ps" not in _RANK_NODES:
        _RANK_NODES["ps"] = create_parallel_state(cfg, ps.rank, ps.world, device=dev)
    return _RANK_NODES["ps"]


def graphed_forward(layer: MoELayer, x: torch.Tensor):
    """The layer's forward and backward captured once as CUDA graphs and replayed: what
    the layer costs when the host launches nothing but two graphs. Needs a GPU and a
    layer that never waits for the host (dropless PFT on one rank)."""
    if x.device.type != "cuda":
        raise ConfigError("pft_graphed: CUDA graphs need a GPU")
    graphed = torch.cuda.make_graphed_callables(layer, (x,), num_warmup_iters=3)
    return lambda: graphed(x)


def torch_native_forward(layer: MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    """The straightforward layer: sort by expert, gather, two grouped GEMMs, index_add_."""
    r = layer.router(x_TD).routing
    K = r.top_k
    ids_N = r.topk_ids_TK.reshape(-1)
    order_N = torch.argsort(ids_N, stable=True)
    token_N = order_N // K
    offs = torch.cumsum(torch.bincount(ids_N, minlength=r.num_experts), 0).to(torch.int32)
    ex = layer.experts
    h = F.gelu(torch._grouped_mm(x_TD[token_N], ex.w1_EFD.transpose(1, 2), offs=offs))
    out = torch._grouped_mm(h, ex.w2_EDF.transpose(1, 2), offs=offs)
    out = out * r.topk_weights_TK.reshape(-1)[order_N, None].to(out.dtype)
    return torch.zeros_like(x_TD).index_add_(0, token_N, out)


def gemm_step(impl: str, s: dict, counts: list[int], dev, dtype):
    """Expert GEMMs alone on pre-permuted rows of the routed sizes."""
    kind = {"ceiling": "auto", "torch_grouped_mm": "torch", "triton_grouped_gemm": "triton"}[impl]
    E, D, Fh = s["experts"], s["hidden"], s["ffn"]
    R = sum(counts)
    w1 = (torch.randn(E, Fh, D, device=dev) / math.sqrt(D)).to(dtype).requires_grad_()
    w2 = (torch.randn(E, D, Fh, device=dev) / math.sqrt(Fh)).to(dtype).requires_grad_()
    x = torch.randn(R, D, device=dev, dtype=dtype, requires_grad=True)
    gy = torch.randn(R, D, device=dev, dtype=dtype)

    gmm = lambda a, w: grouped_mm(a, w, counts, kind)  # noqa: E731
    if impl == "ceiling" and torch_grouped_mm_supported(x, w1.transpose(1, 2)):
        offs = torch.cumsum(torch.tensor(counts, device=dev), 0).to(torch.int32)
        gmm = lambda a, w: torch._grouped_mm(a, w, offs=offs)  # noqa: E731

    def step():
        x.grad = w1.grad = w2.grad = None
        h = F.gelu(gmm(x, w1.transpose(1, 2)))
        gmm(h, w2.transpose(1, 2)).backward(gy)

    return step


def a2a_bandwidth(s: dict, ps, x: torch.Tensor, layer: MoELayer, dev, args) -> dict:
    """PFT's exchange vs plain all_to_all_single with the same splits (forward only)."""
    with torch.no_grad():
        r = layer.router(x).routing
        meta = routing_metadata(r.topk_ids_TK, r.keep_TK, r.num_experts)
        recv_WEl = exchange_counts(meta.counts_E, ps.ep_group)
    El = s["experts"] // ps.ep
    c = meta.counts_E.tolist()
    send = [sum(c[w * El : (w + 1) * El]) for w in range(ps.ep)]
    recv = recv_WEl.sum(1).tolist()
    buf = torch.randn(sum(send), s["hidden"], device=dev, dtype=x.dtype)
    out = buf.new_empty(sum(recv), s["hidden"])
    me = ps.ep_rank
    moved = (sum(send) - send[me]) * s["hidden"] * buf.element_size()
    ours = time_step(
        lambda: all_to_all_uneven(buf, send, recv, ps.ep_group), dev, args.warmup, args.iters
    )
    plain = time_step(
        lambda: dist.all_to_all_single(out, buf, recv, send, group=ps.ep_group),
        dev,
        args.warmup,
        args.iters,
    )
    ms_ours, ms_plain = max_over_ranks(median(ours), dev), max_over_ranks(median(plain), dev)
    return {
        "a2a_ms": ms_ours,
        "plain_a2a_ms": ms_plain,
        "a2a_gbps": moved / ms_ours / 1e6,
        "plain_a2a_gbps": moved / ms_plain / 1e6,
        "a2a_mib_per_rank": moved / 2**20,
    }


def forward_of(impl: str, layer: MoELayer, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The layer's forward on `x` as the implementation runs it."""
    if impl == "torch_native":
        return lambda: torch_native_forward(layer, x)
    if impl == "pft_graphed":
        return graphed_forward(layer, x)
    return lambda: layer(x)


def run_impl(impl: str, routing: str, s: dict, ps, dev, dtype, args) -> dict:
    w_gate, u = gate_weight(s, routing, dev, dtype)
    x, gy = inputs(s, u, routing, ps.rank, dev, dtype)
    extra: dict = {}
    layer = None
    reset_memory(dev)
    if impl in ("ceiling", "torch_grouped_mm", "triton_grouped_gemm"):
        probe = build_layer("pft", s, ps, dev, dtype, w_gate)
        with torch.no_grad():
            r = probe.router(x).routing
        counts = torch.bincount(r.topk_ids_TK.reshape(-1), minlength=s["experts"]).tolist()
        del probe, r
        extra["max_over_mean_load"] = max(counts) / (sum(counts) / len(counts))
        step = gemm_step(impl, s, counts, dev, dtype)
        flops = 2 * 3 * 2 * sum(counts) * s["hidden"] * s["ffn"]
    else:
        layer = build_layer(impl, s, ps, dev, dtype, w_gate)
        fwd = forward_of(impl, layer, x)

        def step():
            layer.zero_grad(set_to_none=True)
            x.grad = None
            fwd().backward(gy)

        flops = 0
    reset_memory(dev)
    with setup_frozen():  # no full collection of the setup's objects inside a timed step
        times = time_step(step, dev, args.warmup, args.iters)
        ms = max_over_ranks(median(times), dev)
        ms_b2b = max_over_ranks(time_back_to_back(step, dev, args.iters), dev)
        extra.update(time_sustained(step, dev, ms_b2b, args.sustained, args.iters))
    case = {
        "gpus": ps.world,
        "routing": routing,
        "impl": impl,
        "ms": round(ms, 3),
        "ms_back_to_back": round(ms_b2b, 3),
        "peak_gib": round(max_over_ranks(peak_gib(dev), dev), 3),
        **extra,
    }
    if flops:
        case["tflops"] = round(flops / ms / 1e9, 1)
    if layer is not None and impl in (
        "pft",
        "pft_overlap",
        "pft_weighted_combine",
        "pft_recompute",
        "rbd_rank",
        "pft_plain",
        "pft_dedup",
        "pft_dedup_overlap",
        "pft_exact_slots",
        "pft_shared",
        "padded",
    ):
        # (not pft_graphed: its stats are those of the captured step)
        case["rows"] = int(max_over_ranks(layer.last_stats["dispatcher"].get("rows", 0.0), dev))
    if layer is not None and impl == "pft_plain" and ps.world > 1:
        # (the exchange of PFT rows without dedup: the sizes plain all_to_all_single gets)
        case.update({k: round(v, 3) for k, v in a2a_bandwidth(s, ps, x, layer, dev, args).items()})
    return case


def goal_lines(cases: list[dict], earlier: list[dict] = ()) -> list[str]:
    """The issue's goals, read off this run's cases (and, for EP, the one-GPU pft case of
    the same routing from `earlier`, the file being appended to): one line per routing
    and goal, "waited for / back to back / sustained" where they are timed. Goals: pft
    within 1.25x of the ceiling, >= 1.5x faster than torch_native, about 4x faster than
    DeepSpeed's layer; peak memory <= 1.2x the ceiling's and <= 0.6x DeepSpeed's; the
    Triton grouped GEMM >= 80 % of torch._grouped_mm; under EP, pft within 1.3x of its
    one-GPU time."""
    lines = []
    one_gpu = {
        c["routing"]: c for c in [*earlier, *cases] if c.get("gpus") == 1 and c["impl"] == "pft"
    }
    for routing in dict.fromkeys(c["routing"] for c in cases):
        by = {c["impl"]: c for c in cases if c["routing"] == routing and "ms" in c}
        pft = by.get("pft")

        def ratio(a: dict, b: dict) -> str:  # a's time over b's, each way it was timed
            keys = ("ms", "ms_back_to_back", "ms_sustained")
            r = [a[k] / b[k] for k in keys if a.get(k) and b.get(k)]
            return " / ".join(f"{v:.2f}x" for v in r)

        if pft is not None:
            gpus = pft["gpus"]
            for impl, goal, slower in (
                ("ceiling", "<= 1.25x", False),
                ("torch_native", ">= 1.5x", True),
                ("deepspeed", "about 4x", True),
            ):
                if impl in by:
                    a, b = (by[impl], pft) if slower else (pft, by[impl])
                    what = f"{impl} / pft" if slower else "pft / ceiling"
                    lines.append(f"{routing}, {gpus} GPU(s): {what} {ratio(a, b)} (goal {goal})")
            for impl, goal in (("ceiling", "<= 1.2x"), ("deepspeed", "<= 0.6x")):
                if impl in by and by[impl].get("peak_gib") and pft.get("peak_gib"):
                    m = pft["peak_gib"] / by[impl]["peak_gib"]
                    lines.append(
                        f"{routing}, {gpus} GPU(s): pft's peak memory {m:.2f}x {impl}'s (goal {goal})"
                    )
            if gpus > 1 and routing in one_gpu:
                lines.append(
                    f"{routing}, EP = {gpus}: pft / its one-GPU time "
                    f"{ratio(pft, one_gpu[routing])} (goal <= 1.3x; one GPU measured "
                    f"{one_gpu[routing].get('date', 'now')})"
                )
        if "triton_grouped_gemm" in by and "torch_grouped_mm" in by:
            r = ratio(by["torch_grouped_mm"], by["triton_grouped_gemm"])
            lines.append(
                f"{routing}: triton grouped GEMM at {r} of _grouped_mm's speed (goal >= 0.80x)"
            )
    return lines


def sweep_gemm(s: dict, dev, dtype, args) -> list[dict]:
    """Time the Triton grouped GEMM (fwd + bwd) under several tile configs."""
    import os

    counts = [s["tokens"] * s["top_k"] // s["experts"]] * s["experts"]
    flops = 2 * 3 * 2 * sum(counts) * s["hidden"] * s["ffn"]
    out = []
    for cfg in [None, *args.sweep_gemm.split(";")]:
        if cfg:
            os.environ["XMOE_TRITON_GMM_CONFIG"] = cfg
        impl = "torch_grouped_mm" if cfg is None else "triton_grouped_gemm"
        try:
            ms = median(time_step(gemm_step(impl, s, counts, dev, dtype), dev, 2, 5))
            out.append(
                {
                    "config": cfg or "torch._grouped_mm",
                    "ms": round(ms, 3),
                    "tflops": round(flops / ms / 1e9, 1),
                }
            )
        except Exception as e:  # a config the device cannot compile
            out.append({"config": cfg, "error": repr(e)[:200]})
        print(out[-1], flush=True)
    os.environ.pop("XMOE_TRITON_GMM_CONFIG", None)
    return out


def sweep_act(s: dict, dev, dtype, args) -> list[dict]:
    """Time the scaled activation's forward and backward kernels, each under several
    launch configs ("rows,BLOCK_F,warps"), at the layer's [T*k, F] rows; prints the best
    of each as an XMOE_ACT_CONFIG value."""
    import os

    from xmoe.kernels.activation import scaled_act_bwd, scaled_act_fwd

    R, F = s["tokens"] * s["top_k"], s["ffn"]
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(R, F, device=dev, dtype=dtype, generator=g)
    gy = torch.randn(R, F, device=dev, dtype=dtype, generator=g)
    w = torch.rand(R, device=dev, dtype=dtype, generator=g)
    moved = {"fwd": 2 * R * F * h.element_size(), "bwd": 3 * R * F * h.element_size()}
    out, best = [], {}
    for cfg in args.sweep_act.split(";"):
        os.environ["XMOE_ACT_CONFIG"] = f"{cfg};{cfg}"
        case: dict = {"config": cfg}
        for kind, fn in (
            ("fwd", lambda: scaled_act_fwd(h, None, w)),
            ("bwd", lambda: scaled_act_bwd(h, None, w, gy)),
        ):
            try:
                ms = median(time_step(fn, dev, 3, 20))
            except Exception as e:  # a config the device cannot compile
                case[f"{kind}_error"] = repr(e)[:200]
                continue
            case[f"{kind}_ms"] = round(ms, 4)
            case[f"{kind}_gbs"] = round(moved[kind] / ms / 1e6, 1)
            if kind not in best or ms < best[kind][0]:
                best[kind] = (ms, cfg)
        print(case, flush=True)
        out.append(case)
    os.environ.pop("XMOE_ACT_CONFIG", None)
    if len(best) == 2:
        print(f"best XMOE_ACT_CONFIG={best['fwd'][1]};{best['bwd'][1]}", flush=True)
    return out


def profile_impl(impl: str, s: dict, ps, dev, dtype, args) -> None:
    """Device time of one implementation's fwd+bwd by kernel (torch.profiler), printed."""
    from torch.profiler import ProfilerActivity, profile

    routing = args.routing.split(",")[0]  # the first of --routing
    w_gate, u = gate_weight(s, routing, dev, dtype)
    x, gy = inputs(s, u, routing, ps.rank, dev, dtype)
    layer = build_layer(impl, s, ps, dev, dtype, w_gate)
    fwd = forward_of(impl, layer, x)

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        fwd().backward(gy)

    time_step(step, dev, args.warmup, 1)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    n = 3
    with setup_frozen(), profile(activities=acts) as prof:
        for _ in range(n):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    if ps.rank == 0:
        key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        print(f"== {impl}, {routing}: {n} steps, by kernel", flush=True)
        print(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90))
    if dev.type == "cuda":
        # every rank's timeline: under EP a late rank makes the others wait in the exchange
        trace = args.trace
        if trace and ps.world > 1:
            path = Path(trace)
            trace = str(path.with_name(f"{path.stem}.rank{ps.rank}{path.suffix}"))
        for r in range(ps.world):
            if r == ps.rank:
                print(f"== rank {r}", flush=True)
                print(profile_gaps(prof, n, keep=trace), flush=True)
            if dist.is_initialized():
                dist.barrier()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--append", action="store_true", help="merge into an existing --out file")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per GPU")
    ap.add_argument("--impls", default="", help="comma list (default: all for this world size)")
    ap.add_argument("--routing", default="balanced,skewed")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--check", action="store_true", help="check the kernels first (GPU)")
    ap.add_argument(
        "--sustained",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="also time each case back to back after SECONDS of it back to back, with the "
        "GPU's clock and power (ms_sustained, sm_mhz, power_w)",
    )
    ap.add_argument(
        "--sweep-gemm",
        default="",
        help='Triton GEMM tile configs "BM,BN,BK,warps,stages;..." to time, then exit',
    )
    ap.add_argument(
        "--sweep-act",
        default="",
        help='scaled activation launch configs "rows,BLOCK_F,warps;..." to time, then exit',
    )
    ap.add_argument("--profile", default="", help="print IMPL's fwd+bwd time by kernel, then exit")
    ap.add_argument("--trace", default="", help="with --profile: keep the Chrome trace here")
    args = ap.parse_args(argv)
    if args.quick:
        args.warmup, args.iters = 2, 5
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu --tiny for a smoke test", file=sys.stderr)
        return 2
    rank, world, dev = init_distributed(args.device)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    s = shape(args)
    if args.check and rank == 0:
        check_kernels(dev)
    if args.sweep_gemm:
        sweep_gemm(s, dev, dtype, args)
        return 0
    if args.sweep_act:
        sweep_act(s, dev, dtype, args)
        return 0
    ps = create_parallel_state(layer_config(s, "pft", None, world, "auto"), rank, world, device=dev)
    if args.profile:
        profile_impl(args.profile, s, ps, dev, dtype, args)
        return 0
    impls = args.impls.split(",") if args.impls else (SINGLE if world == 1 else EP_IMPLS)
    cases = []
    for routing in args.routing.split(","):
        for impl in impls:
            try:
                case = run_impl(impl, routing, s, ps, dev, dtype, args)
            except ConfigError as e:  # e.g. no DeepSpeed on this machine
                case = {"gpus": world, "routing": routing, "impl": impl, "skipped": str(e)}
            except torch.OutOfMemoryError:
                case = {"gpus": world, "routing": routing, "impl": impl, "skipped": "out of memory"}
            except RuntimeError as e:  # a capture the GPU refuses: recorded, the rest still run
                if impl != "pft_graphed":
                    raise
                case = {"gpus": world, "routing": routing, "impl": impl, "skipped": repr(e)[:300]}
            gc.collect()
            if rank == 0:
                print(case, flush=True)
            cases.append(case)
    if rank == 0:
        cmd = " ".join(["python", "benchmarks/moe_layer.py", *map(shlex.quote, sys.argv[1:])])
        if world > 1:
            cmd = f"torchrun --nproc_per_node {world} " + cmd[len("python ") :]
        out = Path(args.out)
        earlier = []  # the appended-to file's cases, read before this run replaces any
        if args.append and out.exists():
            earlier = json.loads(out.read_text()).get("cases", [])
        write_results(args.out, machine_name(dev, world), cmd, cases, args.append)
        for line in goal_lines(cases, earlier):
            print("goal:", line, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
