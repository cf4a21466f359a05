"""The Slurm tests' shared parts: is the local cluster (scripts/slurm-local up) there, waiting on jobs."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable

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


def wait_job(
    job_id: str,
    states: set[str] | frozenset[str],
    timeout_s: float,
    until: Callable[[str], object] | None = None,
    log: Callable[[], str] = lambda: "",
) -> str:
    """Poll until the job is in one of `states` (or `until(state)` holds); cancel it on timeout.

    A requeued job waits about two minutes before Slurm lets it start again (its begin time
    is pushed back); this lets it start at once so that the test runs in seconds.
    """
    from xmoectl import slurm

    deadline = time.monotonic() + timeout_s
    state = "UNKNOWN"
    while time.monotonic() < deadline:
        info = slurm.job_state(job_id)
        state = info["state"]
        if state in states or (until is not None and until(state)):
            return state
        if state == "PENDING" and "BeginTime" in info.get("reason", ""):
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], timeout=30)
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], timeout=30)
    raise AssertionError(f"job {job_id} still {state} after {timeout_s}s: {log()[-3000:]}")
