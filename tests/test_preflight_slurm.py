"""Preflight through the real local Slurm cluster (scripts/slurm-local up): 2 nodes x 2 ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest


def _slurm_ready() -> str:
    if not shutil.which("salloc"):
        return "Slurm is not installed: run `scripts/slurm-local up` as root"
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return "sinfo does not answer: run `scripts/slurm-local up`"
    usable = [ln for ln in out.stdout.splitlines() if ln.split()[-1] in ("idle", "mix")]
    if out.returncode or len(usable) < 2:
        return "the local Slurm cluster is not up with 2 free nodes: run `scripts/slurm-local up`"
    return ""


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(bool(_slurm_ready()), reason=_slurm_ready() or "-"),
]


def test_preflight_inside_a_two_node_allocation(tmp_path):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    cmd = [
        "salloc", "-N", "2", "-n", "4", "--ntasks-per-node", "2", "-t", "5",
        sys.executable, "-m", "xmoectl.cli", "preflight", "--site", "local-slurm", "--nodes", "2",
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    dest = tmp_path / "cfg" / "xmoe" / "site_profiles" / "local-slurm.measured.json"
    data = json.loads(dest.read_text())
    # ranks placed by srun on the two Slurm nodes, found by their node names
    assert (data["launcher"], data["nodes"], data["gpus_per_node"], data["world"]) == (
        "srun", 2, 2, 4,
    )  # fmt: skip
    assert sorted({b["host"] for b in data["binding"]}) == ["n1", "n2"]
    assert data["intra_node"]["ranks"] == 2 and data["intra_node"]["all_to_all_gbs"] > 0
    assert data["inter_node"]["ranks"] == 4 and data["inter_node"]["all_reduce_busbw_gbs"] > 0
    assert "across nodes: all-to-all" in r.stdout


def test_outside_an_allocation_the_user_is_told_how(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(
        [sys.executable, "-m", "xmoectl.cli", "preflight", "--site", "local-slurm", "--nodes", "2"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and "salloc -N 2" in r.stderr
