"""xmoectl against the real local Slurm cluster (scripts/slurm-local up): 2 nodes x 2 ranks."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import yaml
from helpers import xmoectl
from helpers.slurm import needs_slurm, wait_job

from xmoectl import resource_dir, slurm

pytestmark = needs_slurm()


def submitted(r: subprocess.CompletedProcess) -> tuple[Path, str]:
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = Path(re.search(r"run directory: (.+)", r.stdout).group(1))
    job_id = re.search(r"job id:\s+(\S+)", r.stdout).group(1)
    assert json.loads((run_dir / "manifest.json").read_text())["job_id"] == job_id
    return run_dir, job_id


def fake_env(tmp_path: Path, body: str) -> Path:
    """An environment prefix whose `python` is a shell script: the job path without the trainer."""
    prefix = tmp_path / "env"
    py = prefix / "venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text("#!/bin/bash\n" + body)
    py.chmod(0o755)
    return prefix


def sbatch_lines(text: str, drop=("output", "error", "open-mode")) -> set[str]:
    lines = {ln.strip() for ln in text.splitlines() if ln.startswith("#SBATCH")}
    return {ln for ln in lines if not any(ln.startswith(f"#SBATCH --{d}") for d in drop)}


def test_job_script_runs_through_submitit_on_two_nodes(tmp_path):
    """The rendered job.sbatch is what runs: ranks, nodes, rendezvous, profile variables."""
    marker = tmp_path / "marker"
    marker.mkdir()
    prof = yaml.safe_load((resource_dir("site_profiles") / "local-slurm.yaml").read_text())
    prof["name"] = "local-slurm-probe"
    prof["env"]["XMOE_PROBE_VALUE"] = f"$(touch {marker}/x) `touch {marker}/y`; it's"
    site = tmp_path / "local-slurm-probe.yaml"
    site.write_text(yaml.safe_dump(prof))
    out = tmp_path / "ranks"
    out.mkdir()
    prefix = fake_env(
        tmp_path,
        f'printf "%s|%s|%s|%s|%s\\n" "$SLURM_PROCID" "$SLURMD_NODENAME" "$MASTER_ADDR" "$MASTER_PORT" '
        f'"$XMOE_PROBE_VALUE" > {out}/rank-$SLURM_PROCID\nprintf "%s\\n" "$@" > {out}/argv\n',
    )
    runs_dir = tmp_path / "runs"
    r = xmoectl(
        "submit", "--site", str(site), "--nodes", "2", "--set", "train.micro_batch=2", "--env", str(prefix),
        runs_dir=runs_dir,
    )  # fmt: skip
    run_dir, job_id = submitted(r)
    assert wait_job(job_id, slurm.TERMINAL, 120) == "COMPLETED"
    rows = sorted((out / f"rank-{i}").read_text().strip().split("|") for i in range(4))
    assert [row[0] for row in rows] == ["0", "1", "2", "3"]
    assert sorted(row[1] for row in rows) == ["n1", "n1", "n2", "n2"]
    assert {row[2] for row in rows} == {"n1"}
    assert {row[3] for row in rows} == {str(20000 + int(job_id) % 20000)}
    assert {row[4] for row in rows} == {prof["env"]["XMOE_PROBE_VALUE"]}
    assert list(marker.iterdir()) == []
    argv = (out / "argv").read_text().split("\n")
    assert argv[:4] == ["-u", "-m", "xmoe", "train"] and str(run_dir / "config.yaml") in argv
    # submitit's #SBATCH lines are the rendered script's (up to where the log goes)
    script = (run_dir / "job.sbatch").read_text()
    submission = (run_dir / "submitit" / f"{job_id}_submission.sh").read_text()
    assert sbatch_lines(submission) == sbatch_lines(script)
    assert (
        "submitit.core._submit" in submission
    )  # submitit owns the batch step, which runs job.sbatch
    # sacct through slurmdbd sees the finished job exactly
    st = xmoectl("status", job_id, runs_dir=runs_dir)
    assert st.returncode == 0 and "COMPLETED" in st.stdout


def test_failing_job_reads_failed_and_refused_sbatch_leaves_nothing(tmp_path):
    prefix = fake_env(tmp_path, "echo 'rank failing on purpose' >&2\nexit 3\n")
    runs_dir = tmp_path / "runs"
    r = xmoectl(
        "submit", "--site", "local-slurm", "--nodes", "2", "--set", "train.micro_batch=2", "--env", str(prefix),
        "--name", "fails", runs_dir=runs_dir,
    )  # fmt: skip
    run_dir, job_id = submitted(r)
    assert wait_job(job_id, slurm.TERMINAL, 120) == "FAILED"
    logs = xmoectl("logs", "fails", runs_dir=runs_dir)
    assert "rank failing on purpose" in logs.stdout
    r = xmoectl(
        "submit", "--site", "local-slurm", "--nodes", "2", "--set", "train.micro_batch=2", "--partition", "nosuch",
        "--name", "refused", runs_dir=runs_dir,
    )  # fmt: skip
    assert r.returncode == 2 and "sbatch refused the job" in r.stderr and r.stderr.count("\n") == 1
    assert not (runs_dir / "refused").exists()


def test_train_tiny_on_two_nodes_then_status_logs_runs(tmp_path):
    runs_dir = tmp_path / "runs"
    r = xmoectl(
        "submit", "--site", "local-slurm", "--model", "tiny", "--nodes", "2", "--name", "tiny2x2",
        "--set", "train.micro_batch=2", "--set", "train.steps=20", "--set", "train.log_interval=5",
        runs_dir=runs_dir,
    )  # fmt: skip
    run_dir, job_id = submitted(r)
    assert wait_job(job_id, slurm.TERMINAL, 480) == "COMPLETED", xmoectl(
        "logs", "tiny2x2", runs_dir=runs_dir
    ).stdout
    metrics = [
        json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()
    ]
    steps = [m for m in metrics if "loss" in m and "step" in m]
    assert [m["step"] for m in steps][-1] == 20
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5, [m["loss"] for m in steps]
    st = xmoectl("status", "tiny2x2", runs_dir=runs_dir)
    assert st.returncode == 0
    assert f"{job_id}  COMPLETED" in st.stdout and "step=20" in st.stdout and "ranks=4" in st.stdout
    logs = xmoectl("logs", "tiny2x2", runs_dir=runs_dir)
    assert logs.returncode == 0 and "world 4" in logs.stdout and "step     20" in logs.stdout
    follow = xmoectl("logs", "-f", "tiny2x2", runs_dir=runs_dir)  # ends: the job is over
    assert follow.returncode == 0 and "step     20" in follow.stdout
    listing = xmoectl("runs", runs_dir=runs_dir)
    assert re.search(rf"tiny2x2\s+local-slurm\s+{job_id}\s+COMPLETED\s+step=20", listing.stdout)


def test_cancelled_job_reads_cancelled(tmp_path):
    runs_dir = tmp_path / "runs"
    r = xmoectl(
        "submit", "--site", "local-slurm", "--nodes", "2", "--name", "long",
        "--set", "train.micro_batch=2", "--set", "train.steps=1000000", runs_dir=runs_dir,
    )  # fmt: skip
    run_dir, job_id = submitted(r)
    wait_job(job_id, {"RUNNING"}, 120)
    c = xmoectl("cancel", "long", runs_dir=runs_dir)
    assert c.returncode == 0 and f"job {job_id}" in c.stdout
    assert wait_job(job_id, slurm.TERMINAL, 120) == "CANCELLED"
    st = xmoectl("status", "long", runs_dir=runs_dir)
    assert "CANCELLED" in st.stdout
    acct = subprocess.run(
        ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"], capture_output=True, text=True
    )
    assert acct.stdout.split()[0] == "CANCELLED"


def test_torchrun_launcher_trains_on_two_nodes(tmp_path):
    """The torchrun launch block (one task per node, c10d rendezvous) on the same cluster."""
    prof = yaml.safe_load((resource_dir("site_profiles") / "local-slurm.yaml").read_text())
    prof.update(name="local-slurm-torchrun", launcher="torchrun")
    prof["srun"] = {"cpus_per_task": 2}
    site = tmp_path / "local-slurm-torchrun.yaml"
    site.write_text(yaml.safe_dump(prof))
    runs_dir = tmp_path / "runs"
    r = xmoectl(
        "submit", "--site", str(site), "--nodes", "2", "--name", "tr", "--set", "train.micro_batch=2",
        "--set", "train.steps=10", "--set", "train.log_interval=5", runs_dir=runs_dir,
    )  # fmt: skip
    run_dir, job_id = submitted(r)
    assert (
        "torch.distributed.run --nnodes=2 --nproc-per-node=2"
        in (run_dir / "job.sbatch").read_text()
    )
    state = wait_job(job_id, slurm.TERMINAL, 480)
    log = xmoectl("logs", "tr", runs_dir=runs_dir).stdout
    assert state == "COMPLETED", log[-3000:]
    assert "world 4" in log
    steps = [
        json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()
    ]
    assert [m["step"] for m in steps if "loss" in m][-1] == 10


def test_time_limit_signal_checkpoints_requeues_and_resumes(tmp_path):
    """What Slurm does at `--signal=USR2@grace`, sent by hand: checkpoint, requeue, resume."""
    from xmoectl import runs

    runs_dir = tmp_path / "runs"
    r = xmoectl(
        "submit", "--site", "local-slurm", "--nodes", "2", "--name", "rq", "--set", "train.micro_batch=2",
        "--set", "train.steps=30", "--set", "train.log_interval=5", runs_dir=runs_dir,
    )  # fmt: skip
    run_dir, job_id = submitted(r)
    deadline = time.monotonic() + 300
    while (runs.last_metrics(run_dir) or {}).get("step", 0) < 5:
        assert time.monotonic() < deadline, "training did not start"
        assert slurm.job_state(job_id)["state"] not in slurm.TERMINAL
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    state = wait_job(job_id, slurm.TERMINAL, 600)
    log = xmoectl("logs", "rq", runs_dir=runs_dir).stdout
    assert state == "COMPLETED", log[-3000:]
    assert f"requeueing job {job_id}" in log and "resumed from" in log
    show = subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True
    ).stdout
    assert re.search(r"Restarts=1\b", show), show
    steps = [
        json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()
    ]
    assert [m["step"] for m in steps if "loss" in m][-1] == 30
