"""Preflight through the real local Slurm cluster (scripts/slurm-local up): 2 nodes x 2 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers.slurm import needs_slurm

pytestmark = needs_slurm(free=True)


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
