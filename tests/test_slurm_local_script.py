"""scripts/slurm-local on a running cluster: `up` is idempotent, `status` reports it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers.slurm import needs_slurm

ROOT = Path(__file__).resolve().parent.parent
BASE = Path(os.environ.get("XMOE_SLURM_BASE", "/tmp/xmoe-slurm"))

pytestmark = [
    *needs_slurm(),
    pytest.mark.skipif(os.geteuid() != 0, reason="scripts/slurm-local runs as root"),
]


def pids() -> dict[str, str]:
    return {p.name: p.read_text().strip() for p in sorted(BASE.glob("*.pid"))}


def test_up_again_changes_nothing_and_status_is_green():
    before = pids()
    assert "slurmctld.pid" in before and "slurmd-n1.pid" in before and "slurmd-n2.pid" in before
    r = subprocess.run(
        [str(ROOT / "scripts" / "slurm-local"), "up"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "starting" not in r.stdout  # nothing was (re)started
    assert pids() == before
    s = subprocess.run(
        [str(ROOT / "scripts" / "slurm-local"), "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert s.returncode == 0, s.stdout + s.stderr
    assert "slurmctld: running" in s.stdout and "slurmdbd: running" in s.stdout
    nodes = {ln.split()[0] for ln in s.stdout.splitlines() if ln.startswith("n")}
    assert nodes == {"n1", "n2"}
