"""Whether the local Slurm cluster (scripts/slurm-local up) can take the Slurm tests."""

from __future__ import annotations

import shutil
import subprocess

import pytest


def slurm_ready(free: bool = False) -> str:
    """Empty when 2 nodes are up (`free`: both idle or mixed), else why not and the fix."""
    if not shutil.which("salloc" if free else "sinfo"):
        return "Slurm is not installed: run `scripts/slurm-local up` as root"
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return "sinfo does not answer: run `scripts/slurm-local up`"
    states = ("idle", "mix") if free else ("idle", "mix", "alloc")
    usable = [ln for ln in out.stdout.splitlines() if ln.split()[-1] in states]
    if out.returncode or len(usable) < 2:
        nodes = "2 free nodes" if free else "2 nodes"
        return f"the local Slurm cluster is not up with {nodes}: run `scripts/slurm-local up`"
    return ""


def needs_slurm(free: bool = False) -> list:
    """The `pytestmark` of a Slurm test module: marked `slurm`, skipped with the reason."""
    reason = slurm_ready(free)
    return [pytest.mark.slurm, pytest.mark.skipif(bool(reason), reason=reason or "-")]
