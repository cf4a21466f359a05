"""Login-node speed of the quick xmoectl commands: wall and CPU time, best of N runs.

The goal (< 0.3 s wall) is measured here, not asserted in tests: on a shared machine wall
time measures the neighbours. The tests prove the structural half of it instead (the quick
commands import no torch, DeepSpeed, Triton, numpy or submitit).

  python benchmarks/cli_speed.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from xmoectl import render, sites
from xmoectl import runs as run_dirs

COMMANDS = [
    ["--help"],
    ["sites", "list"],
    ["render", "--site", "frontier", "--nodes", "2", "--set", "train.global_batch=16",
     "--set", "train.micro_batch=1", "--dry-run"],
    ["status"],
]  # fmt: skip


def measure(args: list[str], repeat: int, env: dict[str, str]) -> tuple[float, float]:
    best_wall = best_cpu = float("inf")
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        r = subprocess.run(
            [sys.executable, "-m", "xmoectl.cli", *args], capture_output=True, env=env
        )
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if r.returncode != 0:
            raise SystemExit(f"xmoectl {' '.join(args)} failed: {r.stderr.decode()[-500:]}")
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        best_wall, best_cpu = min(best_wall, wall), min(best_cpu, cpu)
    return best_wall, best_cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as runs:
        # one run for `status` to report on (its job id is unknown to Slurm: state UNKNOWN)
        job = render.resolve(
            sites.load("local-slurm"),
            "tiny",
            2,
            Path(runs) / "r",
            overrides=["train.micro_batch=2"],
        )
        run_dirs.write_run(job, render.render_script(job), ["cli_speed"])
        run_dirs.update_manifest(Path(runs) / "r", job_id="999999")
        env = {**os.environ, "XMOE_RUNS": runs}
        print(f"{'command':<40} {'wall s':>8} {'cpu s':>8}")
        for args in COMMANDS:
            wall, cpu = measure(args, a.repeat, env)
            print(f"{' '.join(args[:2]):<40} {wall:8.3f} {cpu:8.3f}")


if __name__ == "__main__":
    main()
