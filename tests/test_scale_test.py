"""xmoectl scale-test without a cluster: grid expansion, refusals, failure classes, the
results store, the report. The runs on the real local Slurm are in test_scale_test_slurm.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from xmoectl import UserError, classify, report
from xmoectl import sweep as SW
from xmoectl import sweep_run as SR

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def xmoectl(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xmoectl.cli", *args],
        capture_output=True, text=True, timeout=120, cwd=cwd, env={**os.environ, **(env or {})},
    )  # fmt: skip


def spec(**kw) -> dict:
    base = dict(site="local-slurm", nodes="1,2", sets=("model.seq_len=64",), steps=10)
    base.update(kw)
    return SW.make_spec(**base)


# --------------------------------------------------------------------------- the grid


def test_vary_axes_shorthands_and_config_keys():
    rbd, tp, topk = SW.parse_vary(["rbd=on,off", "tp=1,2", "moe.top_k=1,2,4"])
    assert [rbd.override(v) for v in rbd.values] == ["moe.dispatcher=rbd", "moe.dispatcher=pft"]
    assert [tp.override(v) for v in tp.values] == ["parallel.tp=1", "parallel.tp=2"]
    assert topk.key == "moe.top_k" and topk.values == ("1", "2", "4")
    assert SW.parse_nodes("8,1,2") == [1, 2, 8]
    for bad, msg in (
        (["nosuch=1,2"], "unknown key 'nosuch'"),
        (["rbd=yes"], "rbd takes on or off"),
        (["tp="], "KEY=V1,V2"),
        (["tp=1,1"], "twice"),
        (["tp=1", "parallel.tp=2"], "parallel.tp is varied twice"),
    ):
        with pytest.raises(UserError, match=msg):
            SW.parse_vary(bad)
    for bad in ("", "1,x", "0,1", "2,2"):
        with pytest.raises(UserError, match="--nodes"):
            SW.parse_nodes(bad)


def test_plan_weak_scaling_grows_the_global_batch_and_groups_arrays_by_shape(tmp_path):
    planned = SW.plan(spec(vary=("rbd=on,off",)), tmp_path / "sw")
    assert [p.name for p in planned] == ["n1-rbd_on", "n2-rbd_on", "n1-rbd_off", "n2-rbd_off"]
    by = {p.name: p for p in planned}
    # tiny: global batch 8 on 2 ranks -> 4 sequences per rank, kept at 2 nodes x 2 ranks
    assert by["n1-rbd_on"].job.config.train.global_batch == 8
    assert by["n2-rbd_on"].job.config.train.global_batch == 16
    assert by["n2-rbd_on"].job.config.train.micro_batch == 4  # preset's 8 does not divide 4
    assert by["n1-rbd_off"].job.config.moe.dispatcher == "pft"
    assert by["n2-rbd_on"].job.config.moe.dispatcher == "rbd"
    assert by["n2-rbd_on"].job.config.train.steps == 10
    assert by["n2-rbd_on"].job.config.train.log_interval == 2
    assert by["n2-rbd_on"].job.config.train.hang_timeout_s == 900
    assert by["n2-rbd_on"].series == "rbd=on"
    # a point at its time limit stops there instead of requeueing itself into a new job
    assert '"${SLURM_RESTART_COUNT:-0}" -lt 0 ]' in by["n2-rbd_on"].script
    assert by["n2-rbd_on"].job.run_dir == (tmp_path / "sw" / "points" / "n2-rbd_on").resolve()
    # points that differ only in config share one job array; node counts do not
    groups = SW.groups(planned)
    assert [[p.name for p in g] for g in groups] == [
        ["n1-rbd_on", "n1-rbd_off"],
        ["n2-rbd_on", "n2-rbd_off"],
    ]
    assert not (tmp_path / "sw").exists()  # planning writes nothing
    # ranks per node as a list: scaling inside the node, points n<nodes>x<ranks>
    planned = SW.plan(spec(nodes="1", tasks_per_node="1,2"), tmp_path / "sw")
    assert [(p.name, p.job.world_size, p.job.config.train.global_batch) for p in planned] == [
        ("n1x1", 1, 8), ("n1x2", 2, 16)
    ]  # fmt: skip


def test_plan_strong_scaling_keeps_the_global_batch(tmp_path):
    planned = SW.plan(spec(weak=False, nodes="1,2"), tmp_path / "sw")
    cfgs = [p.job.config.train for p in planned]
    assert [c.global_batch for c in cfgs] == [8, 8]
    assert [c.micro_batch for c in cfgs] == [4, 2]  # 8 sequences over 2, then 4 DP ranks
    with pytest.raises(UserError, match=r"point n2: --strong: train.global_batch=2 cannot"):
        SW.plan(spec(weak=False, sets=("train.global_batch=2", "train.micro_batch=1")), tmp_path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--vary", "moe.nosuch=1,2"], "point n1-nosuch_1: unknown key moe.nosuch"),
        (["--vary", "parallel.tp=1,3"], "point n1-tp_3: parallel.tp=3 does not divide"),
        (["--vary", "moe.dispatcher=pft,fast"], "moe.dispatcher='fast' is not one of"),
        (["--vary", "nodes=1"], "unknown key 'nodes'"),
        (["--set", "train.steps=0"], "train.steps must be > 0"),
    ],
)
def test_invalid_grids_are_refused_in_one_line_before_anything_is_written(tmp_path, args, message):
    r = xmoectl(
        "scale-test", "--site", "local-slurm", "--nodes", "1,2", *args, "--name", "bad",
        "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()


def test_local_site_takes_one_node_and_resume_needs_only_the_name(tmp_path):
    r = xmoectl("scale-test", "run", "--site", "local", "--nodes", "1,2", cwd=tmp_path)
    assert r.returncode == 2 and "runs on this machine only" in r.stderr
    r = xmoectl("scale-test", "--resume", "--name", "x", "--nodes", "1", cwd=tmp_path)
    assert r.returncode == 2 and "drop --nodes" in r.stderr
    r = xmoectl("scale-test", "--resume", "--name", "x", cwd=tmp_path)
    assert r.returncode == 2 and "no sweep 'x'" in r.stderr
    r = xmoectl("scale-test", "--nodes", "1", cwd=tmp_path)
    assert r.returncode == 2 and "needs --site" in r.stderr


# --------------------------------------------------------------------------- failure classes

WATCHDOG = (
    "xmoe: rank 1: no training step completed within 30 s (last completed step 4); aborting "
    "(train.hang_timeout_s). Stacks of every thread follow."
)


@pytest.mark.parametrize(
    "state, log, cls, evidence",
    [
        ("FAILED", "Traceback (most recent call last):\n  File x\ntorch.OutOfMemoryError: CUDA "
         "out of memory. Tried to allocate 2.00 GiB\nsrun: error: n1: task 0: Exited with exit "
         "code 1", classify.OOM, "CUDA out of memory"),
        ("FAILED", "RuntimeError: HIP out of memory. Tried to allocate 1.50 GiB (GPU 3; 63.98 "
         "GiB total capacity)", classify.OOM, "HIP out of memory"),
        ("OUT_OF_MEMORY", "slurmstepd: error: Detected 1 oom_kill event in StepId=41.0. Some "
         "of the step tasks have been OOM Killed.", classify.OOM, "oom_kill"),
        ("FAILED", WATCHDOG + "\nThread 0x7f (most recent call first):\nsrun: error: n2: task 1:"
         " Exited with exit code 77", classify.HANG, "no training step completed within 30 s"),
        ("FAILED", "[rank3]:[E ProcessGroupNCCL.cpp:616] [Rank 3] Watchdog caught collective "
         "operation timeout: WorkNCCL(SeqNum=12, OpType=ALLTOALL_BASE, Timeout(ms)=600000)",
         classify.HANG, "Watchdog caught collective operation timeout"),
        ("FAILED", "RuntimeError: [../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81]"
         " Timed out waiting 600000ms for recv operation to complete", classify.HANG, "Timed out"),
        ("TIMEOUT", WATCHDOG, classify.HANG, "no training step"),
        ("FAILED", "step 3: non-finite loss, update skipped on every rank (1 in a row, limit 1)\n"
         "xmoe: stopping: 1 steps in a row (up to step 3) had a non-finite loss",
         classify.NAN, "non-finite loss"),
        ("TIMEOUT", "slurmstepd: error: *** JOB 12 ON n1 CANCELLED AT 2026-11-28T10:00:00 DUE "
         "TO TIME LIMIT ***", classify.TIME_LIMIT, "Slurm state TIMEOUT"),
        ("FAILED", "xmoe: requeue signal received: checkpoint written at step 40; exiting with"
         " 75 so the job runs again and resumes", classify.TIME_LIMIT, "requeue signal received"),
        ("NODE_FAIL", "", classify.NODE_FAILURE, "NODE_FAIL"),
        ("FAILED", "srun: error: Node failure on n2\nslurmstepd: error: *** STEP 9.0 ON n1 "
         "CANCELLED AT 2026 DUE TO NODE FAILURE ***", classify.NODE_FAILURE, "Node failure on n2"),
        ("CANCELLED", "slurmstepd: error: *** JOB 5 ON n1 CANCELLED AT 2026-11-28 ***",
         classify.CANCELLED, "CANCELLED AT"),
        ("PREEMPTED", "", classify.CANCELLED, "PREEMPTED"),
        ("FAILED", "loading\nValueError: data.path prefix /x/y.idx does not exist\n"
         "/venv/lib/torch/c10d_logger.py:83: FutureWarning: deprecated\n  return func(*args)",
         classify.OTHER, "ValueError: data.path prefix /x/y.idx does not exist"),
        ("COMPLETED", "", classify.OK, ""),
    ],
)  # fmt: skip
def test_failure_classes_from_state_and_log(state, log, cls, evidence):
    out = classify.classify(state, log)
    assert out.cls == cls
    assert evidence in out.detail


def test_completed_without_metrics_and_stalled_running_points():
    assert classify.classify("COMPLETED", "", has_metrics=False).cls == classify.OTHER
    assert classify.stalled(100.0, 900.0) is None and classify.stalled(100.0, 0) is None
    hung = classify.stalled(1000.0, 900.0)
    assert hung.cls == classify.HANG and "no progress for 1000 s" in hung.detail


# --------------------------------------------------------------------------- the store


def test_store_folds_per_point_and_survives_a_restart(tmp_path):
    root = tmp_path / "runs"
    sp = spec(vary=("train.max_bad_steps=1,20",))
    sw = SW.Sweep.create(root / "sw", sp, SW.plan(sp, root / "sw"))
    names = [p["name"] for p in sw.points]
    assert names == ["n1-max_bad_steps_1", "n2-max_bad_steps_1"] + [
        "n1-max_bad_steps_20", "n2-max_bad_steps_20"
    ]  # fmt: skip
    ok = {"class": "ok", "state": "COMPLETED", "summary": {"tokens_per_s": 10.0}}
    sw.append({"point": names[0], "event": "submitted", "job_id": "7_0"})
    sw.append({"point": names[0], "event": "final", "job_id": "7_0", "state": "FAILED",
               "class": "nan", "detail": "x"})  # fmt: skip
    sw.append({"point": names[1], "event": "submitted", "job_id": "8"})
    sw.append({"point": names[1], "event": "final", "job_id": "8", **ok})
    sw.append({"point": names[2], "event": "submitted", "job_id": "9"})
    sw.append({"point": names[2], "event": "final", "job_id": "9", **ok})
    sw.append({"point": names[2], "event": "final", "job_id": "old", "class": "nan"})  # stale
    with (sw.dir / SW.RESULTS_FILE).open("a") as f:
        f.write('{"point": "n1-max_bad_st')  # a crash in the middle of a line
    again = SW.find("sw", root)  # a new process reads the same facts
    st = again.state()
    assert st[names[0]]["final"]["class"] == "nan"
    assert st[names[1]]["final"]["class"] == "ok" and st[names[2]]["final"]["class"] == "ok"
    assert st[names[3]] == {"job_id": None, "attempts": 0, "final": None}
    # --resume: the failed point and the never-submitted one, not the finished ones
    assert SR.to_resubmit(again) == [names[0], names[3]]
    again.append({"point": names[0], "event": "submitted", "job_id": "10_0"})
    st = SW.Sweep(sw.dir).state()
    assert st[names[0]]["job_id"] == "10_0" and st[names[0]]["final"] is None
    assert st[names[0]]["attempts"] == 2
    with pytest.raises(UserError, match="already exists"):
        SW.Sweep.create(root / "sw", sp, [])


# --------------------------------------------------------------------------- the report


def metrics(tps: list[float], mem: float) -> list[dict]:
    return [
        {"step": 2 * (i + 1), "loss": 5.0 - i, "tokens_per_s": t, "tflops_per_gpu": t / 1000,
         "mfu": None, "peak_mem_gib": mem, "step_time_s": 1.0, "skipped_steps": 0}
        for i, t in enumerate(tps)
    ]  # fmt: skip


def point(name: str, nodes: int, series: str = "") -> dict:
    layout = dict(tp=1, ep=2, dp=2 * nodes, dispatcher="pft", ssmb=True, micro_batch=4,
                  global_batch=8 * nodes, zero_stage=1)  # fmt: skip
    return {"name": name, "nodes": nodes, "series": series, "world_size": 2 * nodes,
            "layout": layout}  # fmt: skip


def final(cls: str, summary: dict | None = None, detail: str = "") -> dict:
    return {"job_id": "1", "final": {"class": cls, "state": "X", "detail": detail,
                                     "summary": summary}}  # fmt: skip


def test_summary_is_the_steady_state_median():
    s = report.summarize(metrics([10.0, 100.0, 120.0, 110.0], 1.5))  # first window: warm-up
    assert s["tokens_per_s"] == 110.0 and s["windows"] == 3 and s["steps"] == 8
    assert s["peak_mem_gib"] == 1.5 and s["mfu"] is None and s["loss"] == 2.0
    assert report.summarize(metrics([50.0], 1.0))["tokens_per_s"] == 50.0
    assert report.summarize([{"step": 1, "loss": 3.0}]) is None


def test_rows_efficiency_per_series_plots_and_compare(tmp_path):
    pts = [point("n1", 1), point("n2", 2), point("n4", 4), point("n2-x", 2, "x=1")]
    state = {
        "n1": final("ok", report.summarize(metrics([1, 100, 100], 2.0))),
        "n2": final("ok", report.summarize(metrics([1, 180, 180], 2.0))),
        "n4": final("oom", None, "torch.OutOfMemoryError: CUDA out of memory"),
        "n2-x": final("ok", report.summarize(metrics([1, 50, 50], 1.0))),
    }
    table = report.rows(pts, state)
    by = {r["point"]: r for r in table}
    assert by["n1"]["efficiency"] == pytest.approx(1.0)
    assert by["n2"]["efficiency"] == pytest.approx(0.9)  # 180/4 per GPU against 100/2
    assert by["n4"]["efficiency"] is None and by["n4"]["result"] == "oom"
    assert by["n2-x"]["efficiency"] == pytest.approx(1.0)  # its own series' smallest point
    text = report.format_table(table)
    assert "tp1 ep2 dp4 pft mb4" in text and "0.90" in text
    assert "oom (torch.OutOfMemoryError: CUDA out of memory)" in text
    paths = report.write(tmp_path, "sw", table)
    for name in ("report.md", "report.json", *report.PLOTS):
        assert (tmp_path / name) in paths
    for name in report.PLOTS:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert json.loads((tmp_path / "report.json").read_text())[1]["efficiency"] == pytest.approx(0.9)

    # an earlier sweep: n1 within noise, n2 4% slower (noise) but 10% more memory, n4 was ok
    before = {
        "n1": final("ok", report.summarize(metrics([1, 103, 103], 2.0))),
        "n2": final("ok", report.summarize(metrics([1, 187.5, 187.5], 1.8))),
        "n4": final("ok", report.summarize(metrics([1, 300, 300], 2.0))),
    }
    changes = report.compare(table, report.rows(pts[:3], before), threshold=0.05)
    flagged = {(c["point"], c["metric"]) for c in changes if c["regression"]}
    assert flagged == {("n2", "peak_mem_gib"), ("n4", "result")}
    out = report.format_comparison(changes, "old", 0.05)
    assert "REGRESSION n4: ok -> oom" in out and "(-4.0%)" in out
    fixed = report.compare(report.rows(pts[:3], before), table, threshold=0.05)
    assert [c for c in fixed if c["metric"] == "result"] == [
        {"point": "n4", "metric": "result", "old": "oom", "new": "ok", "change": None,
         "regression": False}
    ]  # fmt: skip
    changes = report.compare(table, report.rows(pts[:3], before), threshold=0.02)
    assert ("n2", "tokens_per_s") in {(c["point"], c["metric"]) for c in changes if c["regression"]}


@pytest.mark.slow
def test_local_site_scales_ranks_inside_the_node_one_point_at_a_time(tmp_path):
    runs = str(tmp_path / "runs")
    r = xmoectl(
        "scale-test", "--site", "local", "--nodes", "1", "--tasks-per-node", "1,2", "--steps", "4",
        "--name", "loc", "--set", "model.seq_len=32", "--set", "train.micro_batch=2",
        "--set", "train.global_batch=2", "--runs-dir", runs, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "n1x1: running here" in r.stdout and "n1x2: running here" in r.stdout
    sw = SW.find("loc", Path(runs))
    st = {name: s["final"] for name, s in SW.Sweep(sw.dir).state().items()}
    assert st["n1x1"]["class"] == "ok" and st["n1x2"]["class"] == "ok", st
    # one after the other: the second started after the first had finished
    assert st["n1x1"]["time"] <= (sw.dir / "points" / "n1x2" / "manifest.json").stat().st_mtime
    status = xmoectl("scale-test", "status", "loc", "--runs-dir", runs, cwd=tmp_path)
    assert status.returncode == 0 and "2 ok" in status.stdout and "step=4" in status.stdout
    rep = xmoectl("scale-test", "report", "loc", "--runs-dir", runs, cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr
    table = {row["point"]: row for row in json.loads((sw.dir / "report.json").read_text())}
    assert (table["n1x1"]["gpus"], table["n1x2"]["gpus"]) == (1, 2)
    assert table["n1x2"]["global_batch"] == 4 and table["n1x1"]["efficiency"] == 1.0
    assert table["n1x2"]["efficiency"] > 0 and (sw.dir / "efficiency.png").is_file()


def test_skip_invalid_leaves_out_only_the_points_that_cannot_run(tmp_path):
    runs = str(tmp_path / "runs")
    grid = ("scale-test", "--site", "local-slurm", "--nodes", "1,2", "--runs-dir", runs)
    r = xmoectl(*grid, "--vary", "parallel.tp=1,4", "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and "point n1-tp_4: parallel.tp=4 does not divide" in r.stderr
    r = xmoectl(*grid, "--vary", "parallel.tp=1,4", "--dry-run", "--skip-invalid", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "skipped n1-tp_4: parallel.tp=4 does not divide the world size 2" in r.stdout
    assert "3 points, 2 jobs" in r.stdout and re.search(r"^  n2-tp_4 .* tp4 ", r.stdout, re.M)
    r = xmoectl(*grid, "--vary", "parallel.tp=8", "--skip-invalid", cwd=tmp_path)
    assert r.returncode == 2 and "no point of the grid can run; point n1-tp_8" in r.stderr
    assert not (tmp_path / "runs").exists()
    # the sweep keeps what it skipped; status and report say so
    sp = spec(vary=("parallel.tp=1,4",), skip_invalid=True)
    skipped: list = []
    planned = SW.plan(sp, tmp_path / "runs" / "sw", skipped)
    SW.Sweep.create(tmp_path / "runs" / "sw", sp, planned, skipped)
    st = xmoectl("scale-test", "status", "sw", "--runs-dir", runs, cwd=tmp_path)
    assert st.returncode == 0 and "3 not submitted" in st.stdout
    assert "skipped n1-tp_4: parallel.tp=4" in st.stdout


def test_report_cli_writes_into_the_sweep_and_exits_1_on_a_regression(tmp_path):
    root = tmp_path / "runs"
    sp = spec(nodes="1,2")
    for name, tps in (("old", (100.0, 190.0)), ("new", (100.0, 150.0))):
        sw = SW.Sweep.create(root / name, sp, SW.plan(sp, root / name))
        for p, t in zip(sw.points, tps):
            sw.append({"point": p["name"], "event": "submitted", "job_id": f"{name}-{p['name']}"})
            sw.append({"point": p["name"], "event": "final", "job_id": f"{name}-{p['name']}",
                       "state": "COMPLETED", "class": "ok",
                       "summary": report.summarize(metrics([1.0, t], 0.5))})  # fmt: skip
    args = ("--runs-dir", str(root))
    r = xmoectl("scale-test", "report", "new", "--compare", "old", *args, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert "REGRESSION n2: tokens_per_s 190 -> 150 (-21.1%)" in r.stdout
    assert re.search(
        r"^n2\s+2\s+4\s+tp1 ep1 dp4 reference mb4\s+16\s+150 .* 0\.75\s+ok$", r.stdout, re.M
    )
    for name in ("report.md", "report.json", *report.PLOTS):
        assert (root / "new" / name).is_file()
    r = xmoectl("scale-test", "report", "old", "--compare", "new", *args, cwd=tmp_path)
    assert r.returncode == 0 and "REGRESSION" not in r.stdout
