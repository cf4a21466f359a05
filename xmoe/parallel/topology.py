"""Where this process sits: rank, world, local rank and ranks per node, from the launcher.

One reading of the environment for every launcher we support:
- srun-native (`SLURM_PROCID`, `SLURM_LOCALID`, `SLURM_NTASKS`): the rendezvous host is
  the first host of `SLURM_JOB_NODELIST`, expanded here so no `scontrol` is needed;
- torchrun (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`);
- neither: a single process.
An explicit `RANK`/`WORLD_SIZE` wins over Slurm's, so torchrun inside an allocation works.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

DEFAULT_MASTER_PORT = 29500


@dataclass
class Launch:
    """The launcher's view of this process."""

    launcher: str  # "torchrun", "srun" or "single"
    rank: int
    world: int
    local_rank: int
    local_world: int  # ranks on this node (0 = unknown)
    master_addr: str
    master_port: int


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list: `n[1-3,5],gpu-a[01-02]` -> n1 n2 n3 n5 gpu-a01 gpu-a02."""
    hosts: list[str] = []
    # split on commas that are not inside brackets
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        part = part.strip()
        if part:
            hosts.extend(_expand_host(part))
    return hosts


def _expand_host(pattern: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", pattern)
    if not m:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end() :]
    out: list[str] = []
    for item in m.group(1).split(","):
        if "-" in item:
            lo, hi = item.split("-", 1)
            width = len(lo) if lo.startswith("0") else 0
            values = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            values = [item]
        for v in values:
            out.extend(_expand_host(head + v + tail))
    return out


def _tasks_per_node(env: dict[str, str]) -> int:
    # SLURM_NTASKS_PER_NODE or SLURM_TASKS_PER_NODE (e.g. "4(x2)"): the first count
    for key in ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        value = env.get(key, "")
        m = re.match(r"(\d+)", value)
        if m:
            return int(m.group(1))
    return 0


def detect_launch(env: dict[str, str] | None = None) -> Launch:
    """Read the launcher's variables (torchrun first, then srun, else one process)."""
    env = dict(os.environ if env is None else env)
    port = int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT))
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch(
            "torchrun",
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            int(env.get("LOCAL_WORLD_SIZE", 0)),
            env.get("MASTER_ADDR", "127.0.0.1"),
            port,
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR")
        if not addr:
            hosts = expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
            addr = hosts[0] if hosts else "127.0.0.1"
        return Launch(
            "srun",
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            _tasks_per_node(env),
            addr,
            port,
        )
    return Launch("single", 0, 1, 0, 1, "127.0.0.1", port)


def init_distributed(launch: Launch | None = None, timeout_s: float = 600.0):
    """Initialise torch.distributed for this launch; returns (launch, device).

    GPU (CUDA or ROCm through torch.cuda) uses NCCL with the device set *before* the
    process group exists (otherwise NCCL collectives can hang); CPU uses gloo. A single
    process gets a one-rank group too, so the same code path runs everywhere.
    """
    import torch
    import torch.distributed as dist

    launch = launch or detect_launch()
    if torch.cuda.is_available():
        device = torch.device("cuda", launch.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        os.environ["MASTER_ADDR"] = launch.master_addr
        os.environ["MASTER_PORT"] = str(launch.master_port)
        os.environ["RANK"] = str(launch.rank)
        os.environ["WORLD_SIZE"] = str(launch.world)
        os.environ["LOCAL_RANK"] = str(launch.local_rank)
        if launch.world == 1 and launch.launcher == "single":
            # a private store: a lone process must not collide with another on the port
            store = dist.HashStore()
            dist.init_process_group(
                backend, store=store, rank=0, world_size=1, timeout=timedelta(seconds=timeout_s)
            )
        else:
            dist.init_process_group(
                backend,
                rank=launch.rank,
                world_size=launch.world,
                timeout=timedelta(seconds=timeout_s),
            )
    return launch, device


def close_distributed(barrier: bool = True) -> None:
    """Tear the process group down before the process exits.

    Left to the interpreter's exit, gloo's groups are destroyed in no set order while
    other ranks may still be closing their connections, which can abort a rank after a
    run that finished. `barrier` first waits for every rank to be done communicating.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if barrier:
        dist.barrier()
    dist.destroy_process_group()
