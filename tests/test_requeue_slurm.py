"""Requeue on the real local Slurm cluster (scripts/slurm-local up): 2 nodes x 2 ranks.

A job that runs into its time limit gets the warning signal from Slurm, checkpoints, requeues
itself and finishes its steps; the number of such restarts is bounded by the site profile.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml
from helpers.slurm import needs_slurm, wait_job

from xmoectl import resource_dir, slurm

pytestmark = needs_slurm()


def _site(tmp_path: Path, name: str, **slurm_fields) -> Path:
    """The local-slurm profile with other requeue settings (and maybe injected faults)."""
    prof = yaml.safe_load((resource_dir("site_profiles") / "local-slurm.yaml").read_text())
    prof["name"] = name
    env = slurm_fields.pop("env", {})
    prof["slurm"].update(slurm_fields)
    prof["env"].update(env)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(prof))
    return path


def _submit(tmp_path: Path, site: Path, *args: str) -> tuple[Path, str]:
    env = {**os.environ, "XMOE_RUNS": str(tmp_path / "runs")}
    r = subprocess.run(
        [sys.executable, "-m", "xmoectl.cli", "submit", "--site", str(site), "--nodes", "2",
         "--name", "rq", "--set", "train.micro_batch=2", "--set", "train.log_interval=1", *args],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = Path(re.search(r"run directory: (.+)", r.stdout).group(1))
    return run_dir, re.search(r"job id:\s+(\S+)", r.stdout).group(1)


def _scontrol(job_id: str) -> str:
    return subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30
    ).stdout


def _wait(job_id: str, run_dir: Path, timeout_s: float, until=None) -> str:
    """Poll until the job ends (or `until(state)` holds), letting a requeued job start at once."""
    return wait_job(job_id, slurm.TERMINAL, timeout_s, until, log=lambda: _log(run_dir))


def _log(run_dir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in (run_dir / "submitit").glob("*_log.out"))


def _steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["step"] for x in lines if x.strip()]


def _last_step(run_dir: Path) -> int:
    try:
        return max(_steps(run_dir), default=0)
    except (OSError, ValueError):
        return 0


def _wait_training(job_id: str, run_dir: Path) -> None:
    """Until the job has logged step 3 (it trains), failing if it ends first."""
    deadline = time.monotonic() + 300
    while _last_step(run_dir) < 3:
        assert time.monotonic() < deadline, _log(run_dir)[-3000:]
        assert slurm.job_state(job_id)["state"] not in slurm.TERMINAL, _log(run_dir)[-3000:]
        time.sleep(0.5)


def test_time_limit_signal_checkpoints_requeues_and_completes(tmp_path):
    """Slurm itself sends the warning when the job nears its time limit.

    The job starts with room to spare; once it trains, its time limit is cut to 1-2 minutes
    from now, inside the 110 s warning window (what a short allocation looks like from the
    inside), so Slurm sends the warning at its next time-limit check (every 30 s) while at
    least a minute is left; after the requeue the limit is given back so that the second
    allocation can finish.
    """
    steps = 300  # 45-75 s of training: the warning (within ~30 s) comes while it trains
    site = _site(tmp_path, "local-slurm-rq", requeue_grace_s=110, max_restarts=2, time="00:10:00")
    run_dir, job_id = _submit(tmp_path, site, "--set", f"train.steps={steps}")
    _wait_training(job_id, run_dir)
    elapsed_min = int(re.search(r"RunTime=(\d+):(\d+):(\d+)", _scontrol(job_id)).group(2))
    subprocess.run(
        ["scontrol", "update", f"JobId={job_id}", f"TimeLimit={elapsed_min + 2}"],
        check=True,
        timeout=30,
    )
    _wait(job_id, run_dir, 240, until=lambda s: re.search(r"Restarts=1\b", _scontrol(job_id)))
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=10"], timeout=30)
    state = _wait(job_id, run_dir, 400)
    log = _log(run_dir)
    assert state == "COMPLETED", log[-3000:]
    stopped = int(re.search(r"requeue signal received: checkpoint written at step (\d+)", log)[1])
    assert 3 <= stopped < steps
    assert f"requeueing job {job_id} (restart 1 of at most 2)" in log
    assert f"resumed from {run_dir / 'checkpoints' / f'step{stopped:07d}'} at step {stopped}" in log
    assert re.search(r"Restarts=1\b", _scontrol(job_id))
    assert _steps(run_dir) == list(range(1, steps + 1))  # every step once, across the restart
    assert not (run_dir / "requeue").exists()


def test_restarts_are_bounded_by_the_site_profile(tmp_path):
    """With max_restarts=0 the checkpoint is written but the job ends instead of requeueing."""
    site = _site(
        tmp_path, "local-slurm-norq", max_restarts=0, env={"XMOE_FAULT": "signal@rank2:step:3"}
    )
    run_dir, job_id = _submit(tmp_path, site, "--set", "train.steps=20")
    state = _wait(job_id, run_dir, 300)
    log = _log(run_dir)
    assert state == "FAILED", log[-3000:]
    assert "requeue signal received: checkpoint written at step 3" in log
    assert f"job {job_id} already restarted 0 times (slurm.max_restarts)" in log
    assert re.search(r"Restarts=0\b", _scontrol(job_id))
    assert (run_dir / "checkpoints" / "step0000003" / "manifest.json").is_file()
    assert json.loads((run_dir / "requeue").read_text())["step"] == 3
    # continuing by hand (what the message says) picks it up from there
    assert _steps(run_dir) == [1, 2, 3]


def test_torchrun_passes_the_warning_to_its_ranks(tmp_path):
    """torchrun launch: the signal reaches the torchrun of each node, which hands it on."""
    site = _site(tmp_path, "local-slurm-torchrun", requeue_grace_s=60)
    prof = yaml.safe_load(site.read_text())
    prof["launcher"] = "torchrun"
    site.write_text(yaml.safe_dump(prof))
    steps = 80  # the signal below reaches the ranks within a second or two, ~20 s of margin
    run_dir, job_id = _submit(tmp_path, site, "--set", f"train.steps={steps}")
    _wait_training(job_id, run_dir)
    # what Slurm does at the warning time: the signal to every task of the job's steps
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    state = _wait(job_id, run_dir, 600)
    log = _log(run_dir)
    assert state == "COMPLETED", log[-3000:]
    stopped = int(re.search(r"requeue signal received: checkpoint written at step (\d+)", log)[1])
    assert stopped < steps and f"at step {stopped}" in log
    assert re.search(r"Restarts=1\b", _scontrol(job_id))
    assert _steps(run_dir) == list(range(1, steps + 1))
