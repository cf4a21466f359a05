"""Preflight: measure what the planner needs inside an allocation, write it as JSON.

Runs as one process per GPU under srun (ranks from SLURM_*) or torchrun, or as a single
process; `xmoectl preflight` starts it and files the result beside the site profile.

  srun -N 2 -n 16 ... python -m xmoe.tools.preflight --out preflight.json

What it measures, in this order (the cheap, decisive checks first, so a broken job fails
in seconds): the network plugin, once a collective has crossed nodes (NCCL/RCCL load it
lazily, so only the process's own memory map says whether it is really in use); the
binding of each rank to its GPU and to the cores near that GPU; the bf16 GEMM rate; the
device copy bandwidth; then all-to-all and all-reduce bandwidth inside a node and across
nodes. Rank 0 writes one JSON object; the exit status is 3 when the plugin is missing on a
multi-node GPU job (the measurements would only describe the fallback sockets).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

EXIT_NO_PLUGIN = 3
PLUGIN_NAMES = ("libnccl-net", "librccl-net", "libnccl-ofi", "libfabric")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of `fn` (after `warmup` calls), every rank timed between barriers."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _node_ids(world: int, node_size: int) -> list[int]:
    """Node index of every rank: Slurm's node name (several emulated nodes may share one
    host), else the hostname; or `node_size` consecutive ranks (tests)."""
    if node_size:
        return [r // node_size for r in range(world)]
    hosts: list[Any] = [None] * world
    dist.all_gather_object(hosts, os.environ.get("SLURMD_NODENAME") or socket.gethostname())
    order = list(dict.fromkeys(hosts))
    return [order.index(h) for h in hosts]


def loaded_plugins() -> list[str]:
    """Network plugin libraries mapped into this process (Linux /proc/self/maps)."""
    found = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(" ", 1)[-1].strip()
                base = os.path.basename(path)
                if any(base.startswith(n) for n in PLUGIN_NAMES):
                    found.add(path)
    except OSError:
        pass
    return sorted(found)


def binding(device: torch.device) -> dict[str, Any]:
    """This rank's GPU, its cores, and whether those cores are the GPU's local ones."""
    info: dict[str, Any] = {
        "host": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
        "rank": dist.get_rank(),
        "cores": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [],
    }
    for var in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES"):
        if os.environ.get(var):
            info[var] = os.environ[var]
    if device.type != "cuda":
        info["device"] = "cpu"
        info["ok"] = True
        return info
    props = torch.cuda.get_device_properties(device)
    info["device"] = f"{props.name} #{device.index}"
    info["pci"] = pci_address(props)
    local = _pci_local_cpus(info["pci"])
    info["gpu_local_cores"] = local
    info["ok"] = not local or set(info["cores"]) <= set(local)
    return info


def pci_address(props: Any) -> str:
    """The GPU's sysfs PCI address (`0000:1b:00.0`) from torch's device properties."""
    parts = [getattr(props, f"pci_{k}_id", None) for k in ("domain", "bus", "device")]
    if any(not isinstance(p, int) for p in parts):
        return ""
    domain, bus, device = parts
    return f"{domain:04x}:{bus:02x}:{device:02x}.0"


def _pci_local_cpus(bus: str) -> list[int]:
    if not bus:
        return []
    path = f"/sys/bus/pci/devices/{bus.lower()}/local_cpulist"
    try:
        text = open(path).read().strip()
    except OSError:
        return []
    cores: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cores.extend(range(int(lo), int(hi) + 1))
        elif part:
            cores.append(int(part))
    return cores


def gemm_tflops(device: torch.device, n: int, iters: int) -> float:
    """bf16 (fp32 on CPU) n x n x n matmul rate on this rank."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    t = _median_time(lambda: torch.matmul(a, b, out=out), device, 2, iters)
    return 2 * n**3 / t / 1e12


def copy_tbs(device: torch.device, mib: int, iters: int) -> float:
    """Device memory bandwidth of a large copy (read + write), TB/s."""
    x = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = _median_time(lambda: y.copy_(x), device, 2, iters)
    return 2 * x.numel() / t / 1e12


def all_to_all_gbs(group: Any, members: int, mib: int, device: torch.device, iters: int) -> float:
    """Bytes leaving each rank per second in an equal-split all-to-all of `mib` per rank."""
    n = (mib * 2**20 // 2 // members) * members
    send = torch.ones(n, dtype=torch.bfloat16, device=device)
    recv = torch.empty_like(send)
    t = _median_time(lambda: dist.all_to_all_single(recv, send, group=group), device, 2, iters)
    return send.numel() * 2 * (members - 1) / members / t / 1e9


def all_reduce_busbw(group: Any, members: int, mib: int, device: torch.device, iters: int) -> float:
    """All-reduce bus bandwidth (nccl-tests' convention: 2 (n-1)/n x size / time), GB/s."""
    x = torch.ones(mib * 2**20 // 2, dtype=torch.bfloat16, device=device)
    t = _median_time(lambda: dist.all_reduce(x, group=group), device, 2, iters)
    return 2 * (members - 1) / members * x.numel() * 2 / t / 1e9


def _node_groups(nodes: list[int]) -> tuple[Any, list[int]]:
    """This rank's node-local process group (every rank creates every group, in order)."""
    me = dist.get_rank()
    mine, my_ranks = None, []
    for node in sorted(set(nodes)):
        ranks = [r for r, n in enumerate(nodes) if n == node]
        g = dist.new_group(ranks)
        if me in ranks:
            mine, my_ranks = g, ranks
    return mine, my_ranks


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from xmoe.parallel.topology import detect_launch, init_distributed

    launch, device = init_distributed(detect_launch())
    world, rank = launch.world, launch.rank
    on_gpu = device.type == "cuda"
    nodes = _node_ids(world, args.node_size)
    n_nodes = len(set(nodes))
    gpn = world // n_nodes
    result: dict[str, Any] = {
        "schema": 1,
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "launcher": launch.launcher,
        "nodes": n_nodes,
        "gpus_per_node": gpn,
        "world": world,
        "backend": dist.get_backend(),
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "torch": torch.__version__,
        "problems": [],
    }
    if on_gpu:
        result["hbm_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 2)

    # 1. network plugin: only meaningful once traffic has crossed nodes on a GPU backend
    probe = torch.ones(1024, device=device)
    dist.all_reduce(probe)
    _sync(device)
    plugins = loaded_plugins()
    needed = on_gpu and n_nodes > 1
    if args.expect_plugin is not None:
        needed = args.expect_plugin
    flags = torch.tensor([1.0 if plugins else 0.0], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    loaded_everywhere = bool(flags.item())
    result["plugin"] = {"needed": needed, "loaded": loaded_everywhere, "libraries": plugins}
    if needed and not loaded_everywhere:
        result["problems"].append(
            "network plugin not loaded on every rank (no libnccl-net/librccl-net in the process): "
            "inter-node traffic would use sockets; load the site's plugin module"
        )
        result["ok"] = False
        return result

    # 2. binding
    bind: list[Any] = [None] * world
    dist.all_gather_object(bind, binding(device))
    result["binding"] = bind
    devices_per_node: dict[int, list[str]] = {}
    for r, b in enumerate(bind):
        devices_per_node.setdefault(nodes[r], []).append(b.get("pci") or b.get("device", ""))
    shared = on_gpu and any(len(set(v)) < len(v) for v in devices_per_node.values())
    far = [b["rank"] for b in bind if not b.get("ok", True)]
    result["binding_ok"] = not shared and not far
    if shared:
        result["problems"].append(
            "several ranks of a node share one GPU: check --gpus-per-task/--gpu-bind"
        )
    if far:
        result["problems"].append(
            f"ranks {far} run on cores far from their GPU: use --gpu-bind=closest or --cpu-bind"
        )

    # 3. compute and device memory
    rates: list[Any] = [None] * world
    dist.all_gather_object(rates, gemm_tflops(device, args.gemm_n, args.iters))
    result["gemm_n"] = args.gemm_n
    result["gemm_tflops"] = _sig(statistics.median(rates))
    result["gemm_tflops_min"] = _sig(min(rates))
    if on_gpu:
        result["copy_tbs"] = _sig(copy_tbs(device, args.copy_mib, args.iters))

    # 4. collectives inside a node, then across nodes
    local_group, local_ranks = _node_groups(nodes)
    intra = {"ranks": len(local_ranks), "size_mib": args.size_mib}
    if len(local_ranks) > 1:
        a2a = all_to_all_gbs(local_group, len(local_ranks), args.size_mib, device, args.iters)
        ar = all_reduce_busbw(local_group, len(local_ranks), args.size_mib, device, args.iters)
        intra["all_to_all_gbs"], intra["all_reduce_busbw_gbs"] = _min_over_ranks([a2a, ar], device)
    result["intra_node"] = intra
    if n_nodes > 1:
        a2a = all_to_all_gbs(None, world, args.size_mib, device, args.iters)
        ar = all_reduce_busbw(None, world, args.size_mib, device, args.iters)
        a2a_min, ar_min = _min_over_ranks([a2a, ar], device)
        # of each rank's all-to-all bytes, (world - gpn) / (world - 1) cross nodes; they set the pace
        result["inter_node"] = {
            "ranks": world,
            "size_mib": args.size_mib,
            "all_to_all_gbs": _sig(a2a_min * (world - gpn) / (world - 1)),
            "all_reduce_busbw_gbs": ar_min,
        }
    result["ok"] = result["binding_ok"]
    if rank == 0:
        print(f"preflight: {n_nodes} node(s) x {gpn}, {result['device']}", flush=True)
    return result


def _sig(x: float) -> float:
    """Four significant digits (CPU test runs measure tiny rates)."""
    return float(f"{x:.4g}")


def _min_over_ranks(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return [_sig(v) for v in t.tolist()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m xmoe.tools.preflight", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", required=True, help="JSON file rank 0 writes")
    p.add_argument(
        "--size-mib",
        type=int,
        default=0,
        help="collective size per rank (default 256 on GPU, 1 on CPU)",
    )
    p.add_argument(
        "--gemm-n", type=int, default=0, help="GEMM size (default 8192 on GPU, 256 on CPU)"
    )
    p.add_argument("--copy-mib", type=int, default=1024)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument(
        "--node-size", type=int, default=0, help="declare nodes of this many ranks (tests)"
    )
    plug = p.add_mutually_exclusive_group()
    plug.add_argument("--expect-plugin", dest="expect_plugin", action="store_true", default=None)
    plug.add_argument("--no-expect-plugin", dest="expect_plugin", action="store_false")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    args.size_mib = args.size_mib or (256 if gpu else 1)
    args.gemm_n = args.gemm_n or (8192 if gpu else 256)
    result = measure(args)
    if dist.get_rank() == 0:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        os.replace(tmp, args.out)
        for problem in result["problems"]:
            print(f"preflight: {problem}", file=sys.stderr, flush=True)
    plugin = result.get("plugin", {})
    failed = plugin.get("needed") and not plugin.get("loaded")
    dist.barrier()
    dist.destroy_process_group()
    return EXIT_NO_PLUGIN if failed else 0


if __name__ == "__main__":
    sys.exit(main())
