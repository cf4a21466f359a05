"""RBD against PFT: rows and bytes across and inside nodes, and the MoE step time.

Two parts, one JSON file:

* `measured`: 4 GPUs of one host declared as 2 virtual nodes x 2 (and as one node of 4,
  where RBD is PFT), small-preset MoE shapes (64 experts, top-6, hidden 2048, GELU
  experts of 1408), balanced and skewed routing. For each dispatcher: the counters the
  dispatcher reports (summed over ranks), and the time of one MoE step (dispatch,
  grouped-GEMM experts, combine, forward + backward) and of the exchange alone (experts
  replaced by a scale). One host has no real network between the virtual nodes, so the
  times show RBD's extra step and index work, not the network time it saves.
* `simulated`: Frontier-scale layouts (8 GCDs a node, one expert per GCD) where the
  analytic expected inter-node rows per token under uniform routing sit next to what the
  dispatcher's own planning code counts on simulated routing of that size.

  python benchmarks/rbd.py --out benchmarks/results/rbd.json          # GPUs (NCCL)
  python benchmarks/rbd.py --cpu --tokens 256 --hidden 64 --iters 2   # smoke test (gloo)
  python benchmarks/rbd.py --simulate-only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xmoe.config import load_config  # noqa: E402
from xmoe.moe.dispatch import Routing  # noqa: E402
from xmoe.moe.experts import GroupedExperts  # noqa: E402
from xmoe.moe.pft import PFTDispatcher  # noqa: E402
from xmoe.moe.rbd import RBDDispatcher  # noqa: E402
from xmoe.moe.rbd_plan import NodeLayout, host_splits, node_limited_topk, plan_sender  # noqa: E402
from xmoe.moe.router import capacity_keep_mask  # noqa: E402
from xmoe.parallel.groups import create_parallel_state  # noqa: E402

COUNTERS = (
    "routed_rows",
    "pilot_rows",
    "inter_node_rows",
    "inter_node_bytes",
    "pft_inter_node_rows",
    "intra_node_rows",
    "intra_node_bytes",
)


def scores(T: int, E: int, kind: str, seed: int) -> torch.Tensor:
    """Per-token expert scores whose top-k is a draw of k distinct experts (Gumbel top-k).
    balanced: uniform experts; skewed: Zipf(1.2) expert popularity, hot experts spread
    over the nodes at random (a few hot experts, as early in training)."""
    g = torch.Generator().manual_seed(seed)
    logp_E = torch.zeros(E)
    if kind == "skewed":
        logp_E = -1.2 * torch.log(torch.arange(1, E + 1, dtype=torch.float64)).float()
        logp_E = logp_E[torch.randperm(E, generator=torch.Generator().manual_seed(7))]
    return logp_E - torch.log(-torch.log(torch.rand(T, E, generator=g).clamp_min(1e-20)))


def route(
    T: int, E: int, K: int, kind: str, seed: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids and renormalised combine weights."""
    ids_TK = torch.topk(scores(T, E, kind, seed), K, dim=-1).indices
    w_TK = torch.rand(T, K, generator=torch.Generator().manual_seed(seed + 1)) + 0.1
    return ids_TK.to(device), (w_TK / w_TK.sum(-1, keepdim=True)).to(device)


def _time(fn, iters: int, device) -> float:
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - t0)
    # the step is as slow as its slowest rank
    t = torch.tensor([statistics.median(samples)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item()) * 1e3


def _diff_vs_pft(cfg, state, experts, x_TD, ids_TK, w_TK, keep_TK, g_TD) -> float:
    """Largest relative difference of RBD from PFT in output, x grad and weight grad."""
    got = []
    for cls in (PFTDispatcher, RBDDispatcher):
        x = x_TD.detach().clone().requires_grad_()
        w = w_TK.detach().clone().requires_grad_()
        disp = cls(cfg, state)
        d = disp.dispatch(x, Routing(ids_TK, w, keep_TK, cfg.moe.num_experts))
        out = disp.combine(experts(d.x_RD, d.counts_El, d.weights_R), d)
        out.backward(g_TD)
        got.append((out.detach(), x.grad, w.grad))
    worst = 0.0
    for a, b in zip(*got):
        worst = max(worst, ((a.float() - b.float()).abs().max() / b.float().abs().max()).item())
    t = torch.tensor([worst], dtype=torch.float64, device=x_TD.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _worker(rank: int, world: int, init_file: str, args: argparse.Namespace, out_file: str) -> None:
    use_cuda = not args.cpu
    if use_cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    dist.init_process_group(
        "nccl" if use_cuda else "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
    )
    dtype = torch.bfloat16 if use_cuda else torch.float32
    E, K, D, F = args.experts, args.top_k, args.hidden, args.expert_hidden
    El = E // world
    cfg = load_config("small", [f"parallel.ep={world}", f"moe.num_experts={E}", f"moe.top_k={K}"])
    experts = GroupedExperts(El, D, F, "gelu", grouped_gemm="auto", first_expert=rank * El)
    experts = experts.to(device=device, dtype=dtype)
    results = []
    for node_size in args.node_sizes:
        cfg.parallel.node_size = node_size
        state = create_parallel_state(cfg, rank, world, device=device)
        for kind, cf in [(k, c) for k in ("balanced", "skewed") for c in args.capacity_factors]:
            ids_TK, w_TK = route(args.tokens, E, K, kind, 100 + rank, device)
            keep_TK = None
            if cf > 0:  # the router's drop policy, ranking by the combine weight
                cap = math.ceil(args.tokens * K * cf / E)
                keep_TK = capacity_keep_mask(ids_TK, w_TK, E, cap)
            x_TD = torch.randn(args.tokens, D, device=device, dtype=dtype, requires_grad=True)
            w_TK = w_TK.to(dtype).requires_grad_()
            g_TD = torch.randn(args.tokens, D, device=device, dtype=dtype)
            diff = _diff_vs_pft(cfg, state, experts, x_TD, ids_TK, w_TK, keep_TK, g_TD)
            for name in ("pft", "rbd"):
                disp = (PFTDispatcher if name == "pft" else RBDDispatcher)(cfg, state)
                r = Routing(ids_TK, w_TK, keep_TK, E)

                def step(with_experts: bool, disp=disp, r=r, x_TD=x_TD, g_TD=g_TD) -> None:
                    d = disp.dispatch(x_TD, r)
                    if with_experts:
                        y_RD = experts(d.x_RD, d.counts_El, d.weights_R)
                    else:  # rows straight back (scaled by their weights where PFT folds them)
                        y_RD = d.x_RD * (2.0 if d.weights_R is None else d.weights_R[:, None])
                    disp.combine(y_RD, d).backward(g_TD)

                layer_ms = _time(lambda s=step: s(True), args.iters, device)
                exchange_ms = _time(lambda s=step: s(False), args.iters, device)
                probe = RBDDispatcher(cfg, state)  # RBD's counters for PFT's routing too
                stats = probe.dispatch(x_TD.detach(), r).stats
                sums = torch.tensor(
                    [stats[c] for c in COUNTERS], dtype=torch.float64, device=device
                )
                dist.all_reduce(sums)
                tot = dict(zip(COUNTERS, sums.tolist()))
                row_bytes = D * x_TD.element_size()
                if name == "pft":
                    inter_rows, inter_bytes = (
                        tot["pft_inter_node_rows"],
                        tot["pft_inter_node_rows"] * row_bytes,
                    )
                else:
                    inter_rows, inter_bytes = tot["inter_node_rows"], tot["inter_node_bytes"]
                results.append(
                    {
                        "dispatcher": name,
                        "nodes": world // node_size,
                        "ranks_per_node": node_size,
                        "routing": kind,
                        "capacity_factor": cf or None,
                        "tokens_per_rank": args.tokens,
                        "inter_node_rows": inter_rows,
                        "inter_node_bytes": inter_bytes,
                        "routed_rows": tot["routed_rows"],
                        "pilot_rows": tot["pilot_rows"],
                        "dedup_ratio": tot["routed_rows"] / max(tot["pilot_rows"], 1.0),
                        "rbd_intra_node_rows": tot["intra_node_rows"],
                        "layer_step_ms": layer_ms,
                        "max_rel_diff_vs_pft": diff if name == "rbd" else 0.0,
                        "exchange_step_ms": exchange_ms,
                    }
                )
                if rank == 0:
                    print(json.dumps(results[-1]), flush=True)
    if rank == 0:
        Path(out_file).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def analytic_inter_rows(E: int, K: int, nodes: int) -> tuple[float, float]:
    """Expected rows per token sent to other nodes under uniform top-k (distinct experts):
    PFT sends every copy, K (N-1)/N; RBD one pilot per other node the token touches,
    (N-1) (1 - C(E - E/N, K) / C(E, K))."""
    En = E // nodes
    miss = math.comb(E - En, K) / math.comb(E, K)
    return K * (nodes - 1) / nodes, (nodes - 1) * (1 - miss)


def simulate(tokens: int) -> list[dict]:
    """Count what RBD's planning code sends across nodes for one rank's routing."""
    rows = []
    layouts = [(64, 6, 8, 8), (256, 8, 32, 8)]  # experts, top-k, nodes, GCDs per node
    for E, K, nodes, per_node in layouts:
        W = nodes * per_node
        lay = NodeLayout(W, per_node, E // W, rank=0)
        pft_a, rbd_a = analytic_inter_rows(E, K, nodes)
        for kind in ("balanced", "skewed"):
            for max_nodes in (0, 4):
                ids_TK = node_limited_topk(scores(tokens, E, kind, 5), K, max_nodes, E // nodes)
                plan = plan_sender(ids_TK, None, lay)
                sent = plan.msg_WC.tolist()
                sp = host_splits(sent, [[0] * lay.msg_width] * W, lay)
                pilots = sum(sp.pilots_sent) - sp.pilots_sent[lay.node]
                copies = sum(sp.replicas_sent) - sp.replicas_sent[lay.node]
                row = {
                    "experts": E,
                    "top_k": K,
                    "nodes": nodes,
                    "ranks_per_node": per_node,
                    "routing": kind,
                    "max_nodes_per_token": max_nodes,
                    "tokens": tokens,
                    "pft_inter_rows_per_token": copies / tokens,
                    "rbd_inter_rows_per_token": pilots / tokens,
                    "measured_reduction": copies / max(pilots, 1),
                }
                if kind == "balanced" and not max_nodes:
                    row |= {
                        "analytic_pft_rows_per_token": pft_a,
                        "analytic_rbd_rows_per_token": rbd_a,
                        "analytic_reduction": pft_a / rbd_a,
                    }
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--node-sizes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per rank per step")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--expert-hidden", type=int, default=1408)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument(
        "--capacity-factors", type=float, nargs="+", default=[0.0, 1.25], help="0 = dropless"
    )
    ap.add_argument("--cpu", action="store_true", help="gloo on CPU processes (smoke test)")
    ap.add_argument("--simulate-only", action="store_true")
    ap.add_argument("--sim-tokens", type=int, default=16384)
    ap.add_argument("--out", default="benchmarks/results/rbd.json")
    args = ap.parse_args()
    report: dict = {"command": "python " + " ".join(sys.argv)}
    if not args.simulate_only:
        world = args.gpus
        if not args.cpu and torch.cuda.device_count() < world:
            sys.exit(f"--gpus {world} but only {torch.cuda.device_count()} GPUs are visible")
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "measured.json")
            mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), args, out), nprocs=world)
            report["measured"] = json.loads(Path(out).read_text())
        report["device"] = torch.cuda.get_device_name(0) if not args.cpu else "cpu"
    report["simulated"] = simulate(args.sim_tokens)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
