"""The `local` site: the README's `xmoectl submit --site local --model tiny`, for real."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from helpers import xmoectl as run_xmoectl

from xmoectl import local


def xmoectl(*args: str, runs_dir: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return run_xmoectl(*args, runs_dir=runs_dir, timeout=timeout)


@pytest.mark.slow
def test_submit_local_trains_and_follows_live(tmp_path):
    runs_dir = tmp_path / "runs"
    r = xmoectl(
        "submit", "--site", "local", "--model", "tiny", "--name", "here",
        "--set", "train.steps=15", "--set", "train.log_interval=5", runs_dir=runs_dir,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # followed live: the trainer's step lines came through xmoectl's stdout
    assert re.search(r"step\s+15 \| loss", r.stdout)
    assert "here: COMPLETED  step=15" in r.stdout
    run_dir = runs_dir / "here"
    metrics = [
        json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()
    ]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.5
    st = xmoectl("status", "here", runs_dir=runs_dir)
    assert "COMPLETED" in st.stdout and "step=15" in st.stdout


def test_local_run_can_be_cancelled(tmp_path):
    runs_dir = tmp_path / "runs"
    r = xmoectl(
        "submit", "--site", "local", "--name", "long", "--no-follow", "--set", "train.steps=1000000",
        runs_dir=runs_dir,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    job_id = re.search(r"job id:\s+(local-\d+)", r.stdout).group(1)
    run_dir = runs_dir / "long"
    assert local.job_state(run_dir, job_id)["state"] == "RUNNING"
    c = xmoectl("cancel", "long", runs_dir=runs_dir)
    assert c.returncode == 0
    pid = int(job_id.split("-")[1])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)  # any process of the run's group left?
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the run's processes outlived cancel")
    assert "CANCELLED" in xmoectl("status", "long", runs_dir=runs_dir).stdout
