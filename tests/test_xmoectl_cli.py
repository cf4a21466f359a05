"""Login-node speed: the quick commands never import torch/DeepSpeed/Triton and stay light."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from xmoectl import render, runs
from xmoectl import sites as S

HEAVY = ("torch", "deepspeed", "triton", "numpy", "submitit")


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    job = render.resolve(
        S.load("local-slurm"), "tiny", 2, root / "r", overrides=["train.micro_batch=2"]
    )
    runs.write_run(job, render.render_script(job), ["test"])
    runs.update_manifest(root / "r", job_id="999999")  # status asks squeue/sacct for it
    return root


COMMANDS = [
    ["--help"],
    ["sites", "list"],
    ["render", "--site", "frontier", "--nodes", "2", "--set", "train.global_batch=16", "--set",
     "train.micro_batch=1", "--dry-run"],
    ["status"],
]  # fmt: skip


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_quick_commands_import_nothing_heavy(args, runs_dir):
    env = {**os.environ, "XMOE_RUNS": str(runs_dir)}
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "xmoectl.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    modules = {
        ln.split("|")[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")
    }
    assert modules, "no -X importtime output"
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert heavy == [], f"{' '.join(args)} imported {heavy[:5]}"


def test_version_and_unknown_command():
    r = subprocess.run(
        [sys.executable, "-m", "xmoectl.cli", "--version"], capture_output=True, text=True
    )
    import xmoe

    assert r.returncode == 0 and xmoe.__version__ in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "xmoectl.cli", "sbumit"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
