"""xmoectl scale-test against the real local Slurm cluster (scripts/slurm-local up; 2 nodes).

One sweep of four points (nodes 1,2 x train.max_bad_steps=1,20) with a NaN injected into
every run's loss at step 3 (XMOE_FAULT, inherited by the jobs through sbatch): the points
allowed one bad step stop with a NaN, the others skip the step and finish. Then --resume
without the fault resubmits exactly the two failed points.
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
from helpers import xmoectl as run_xmoectl
from helpers.slurm import needs_slurm

from xmoectl import resource_dir
from xmoectl import sweep as SW
from xmoectl import sweep_run as SR

pytestmark = needs_slurm()

GRID = (
    "--site", "local-slurm", "--nodes", "1,2", "--vary", "train.max_bad_steps=1,20",
    "--steps", "10", "--set", "model.seq_len=64", "--hang-timeout", "300",
)  # fmt: skip


def xmoectl(*args: str, runs_dir: Path, fault: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XMOE_FAULT"}
    if fault:
        env["XMOE_FAULT"] = fault
    return run_xmoectl(*args, "--runs-dir", str(runs_dir), env=env)


def queued(name: str) -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-n", f"xmoe-{name}", "-o", "%i"], capture_output=True, text=True
    )
    return out.stdout.split()


def wait_final(sw: SW.Sweep, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        st = SR.refresh(sw)
        if all(s["final"] is not None for s in st.values()):
            return st
        if time.monotonic() > deadline:
            for s in st.values():
                if s["job_id"] and s["final"] is None:
                    subprocess.run(["scancel", s["job_id"]], timeout=30)
            raise AssertionError(f"sweep not done after {timeout_s}s: {st}")
        time.sleep(1.0)


def test_dry_run_shows_every_job_and_submits_nothing(tmp_path):
    runs = tmp_path / "runs"
    r = xmoectl("scale-test", *GRID, "--name", "dry", "--dry-run", runs_dir=runs)
    assert r.returncode == 0, r.stderr
    assert "4 points, 2 jobs" in r.stdout and "nothing submitted" in r.stdout
    jobs = re.findall(r"^job \d \(array of 2\): sbatch (.*)$", r.stdout, re.M)
    assert len(jobs) == 2 and "--nodes=1" in jobs[0] and "--nodes=2" in jobs[1]
    for name in ("n1-max_bad_steps_1", "n2-max_bad_steps_1", "n1-max_bad_steps_20"):
        assert re.search(rf"^  {name}\s+nodes", r.stdout, re.M)
    assert "train.max_bad_steps=20 --set train.global_batch=16" in r.stdout
    assert not runs.exists() and queued("dry") == []


def test_grid_beyond_the_partition_is_refused(tmp_path):
    r = xmoectl("scale-test", "--site", "local-slurm", "--nodes", "1,4", runs_dir=tmp_path / "r")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "xmoectl: error: --nodes 4 does not fit: partition debug has 2 nodes"
    )
    assert not (tmp_path / "r").exists()


def test_memory_beyond_the_node_is_refused_before_anything_is_submitted(tmp_path):
    """`sbatch --test-only` asks Slurm about every job shape: --mem beyond the node's."""
    prof = yaml.safe_load((resource_dir("site_profiles") / "local-slurm.yaml").read_text())
    prof["name"] = "local-slurm-bigmem"
    prof["slurm"]["extra_sbatch"] = ["--mem=100000"]  # MB; the nodes declare 2000
    site = tmp_path / "local-slurm-bigmem.yaml"
    site.write_text(yaml.safe_dump(prof))
    r = xmoectl("scale-test", "--site", str(site), "--nodes", "1,2", "--name", "big",
                runs_dir=tmp_path / "r")  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "point n1: sbatch --test-only refuses it:" in r.stderr
    assert "Requested node configuration is not available" in r.stderr
    assert not (tmp_path / "r").exists() and queued("n1") == [] and queued("big") == []


def test_sweep_runs_classifies_a_nan_reports_and_resumes_only_the_failed(tmp_path):
    runs = tmp_path / "runs"
    r = xmoectl("scale-test", *GRID, "--name", "sw", runs_dir=runs, fault="nan@step:3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(re.findall(r"^array of 2 \d+: ", r.stdout, re.M)) == 2
    sw = SW.find("sw", runs)
    st = wait_final(sw, 480)
    bad, good = ["n1-max_bad_steps_1", "n2-max_bad_steps_1"], ["n1-max_bad_steps_20", "n2-max_bad_steps_20"]  # fmt: skip
    for name in bad:
        assert st[name]["final"]["state"] == "FAILED"
        assert st[name]["final"]["class"] == "nan", st[name]["final"]
        assert "non-finite loss" in st[name]["final"]["detail"]
    for name in good:
        assert st[name]["final"]["class"] == "ok", st[name]["final"]
        assert st[name]["final"]["summary"]["steps"] == 10
        assert st[name]["final"]["summary"]["skipped_steps"] == 1  # the NaN step, skipped
    # the point's own run directory works with the ordinary commands (array task log linked)
    logs = subprocess.run(
        [sys.executable, "-m", "xmoectl.cli", "logs", str(sw.point_dir(bad[0]))],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "had a non-finite loss" in logs.stdout

    status = xmoectl("scale-test", "status", "sw", runs_dir=runs)
    assert status.returncode == 0
    assert re.search(r"n1-max_bad_steps_1\s+1\s+\d+_0\s+FAILED\s+nan", status.stdout)
    assert re.search(r"n2-max_bad_steps_20\s+2\s+\d+_1\s+COMPLETED\s+ok\s+step=10", status.stdout)
    assert "2 nan, 2 ok" in status.stdout

    rep = xmoectl("scale-test", "report", "sw", runs_dir=runs)
    assert rep.returncode == 0, rep.stderr
    assert re.search(
        r"n2-max_bad_steps_20\s+2\s+4\s+tp1 ep1 dp4 reference mb4\s+16\s+\d+", rep.stdout
    )
    table = json.loads((sw.dir / "report.json").read_text())
    eff = {row["point"]: row["efficiency"] for row in table}
    assert eff["n1-max_bad_steps_20"] == 1.0 and eff["n2-max_bad_steps_20"] > 0
    assert eff["n1-max_bad_steps_1"] is None
    for png in ("throughput.png", "efficiency.png", "memory.png"):
        assert (sw.dir / png).read_bytes().startswith(b"\x89PNG")

    before = {name: s["job_id"] for name, s in st.items()}
    res = xmoectl("scale-test", "run", "--resume", "--name", "sw", runs_dir=runs)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resubmitting 2 of 4 points" in res.stdout
    submitted = [json.loads(x) for x in (sw.dir / "results.jsonl").read_text().splitlines()]
    submitted = [x["point"] for x in submitted if x["event"] == "submitted"]
    assert sorted(submitted) == sorted(bad * 2 + good)  # only the failed points again
    st = wait_final(sw, 480)
    assert all(s["final"]["class"] == "ok" for s in st.values()), st
    assert all(st[n]["job_id"] == before[n] for n in good)
    assert all(st[n]["job_id"] != before[n] and st[n]["attempts"] == 2 for n in bad)
    again = xmoectl("scale-test", "--resume", "--name", "sw", runs_dir=runs)
    assert again.returncode == 0 and "nothing to resubmit" in again.stdout


def test_a_hung_rank_is_classified_as_a_hang(tmp_path):
    """One rank stops before step 2 (XMOE_FAULT); the trainer's watchdog, set by
    --hang-timeout, ends the job instead of letting it sit until the time limit."""
    runs = tmp_path / "runs"
    r = xmoectl(
        "scale-test", "--site", "local-slurm", "--nodes", "1", "--steps", "6", "--name", "hang",
        "--set", "model.seq_len=64", "--hang-timeout", "20", runs_dir=runs,
        fault="hang@rank1:step:2",
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"^job \d+: n1$", r.stdout, re.M)  # one point: a plain job, no array
    sw = SW.find("hang", runs)
    st = wait_final(sw, 300)["n1"]["final"]
    assert (st["state"], st["class"]) == ("FAILED", "hang"), st
    assert "no training step completed within 20 s" in st["detail"]
    status = xmoectl("scale-test", "status", "hang", runs_dir=runs)
    assert re.search(
        r"n1\s+1\s+\d+\s+FAILED\s+hang\s+xmoe: rank \d: no training step", status.stdout
    )
