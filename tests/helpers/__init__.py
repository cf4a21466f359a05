"""Shared test utilities: free ports, running the trainer and the xmoectl CLI as real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for key in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_JOB_ID",
    ):
        env.pop(key, None)
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_xmoe(args: list[str], nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m xmoe ARGS` as one process, or under torchrun with `nproc` gloo ranks."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "xmoe", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
            "-m",
            "xmoe",
            *args,
        ]
    return subprocess.run(
        cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def xmoectl(
    *args: str,
    cwd: Path | str | None = None,
    env: dict[str, str] | None = None,
    runs_dir: Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess:
    """`python -m xmoectl.cli ARGS`; with `runs_dir` its runs are filed there (XMOE_RUNS)."""
    if runs_dir is not None:
        env = {**(os.environ if env is None else env), "XMOE_RUNS": str(runs_dir)}
    return subprocess.run(
        [sys.executable, "-m", "xmoectl.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )
