"""Running a sweep: submitting its points, following them, resubmitting the failed ones.

`start` checks the whole grid (`sweep.plan`) before it writes or submits anything, then
submits one Slurm job array per job shape (points that differ only in their config share
one `sbatch`); the local site runs its points one after the other, never side by side.
`refresh` asks the scheduler about every unfinished point and appends each final result
(state, failure class from `classify`, steady-state figures) to the sweep's store once, so
a later `status` or `report` needs neither squeue nor sacct for finished points.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from xmoectl import UserError
from xmoectl.sweep import SWEEP_FILE, Planned, Sweep, groups, plan

# --------------------------------------------------------------------------- submission


def _fresh_point_dir(d: Path) -> None:
    """A resubmitted point measures from scratch: no metrics, checkpoints or exit code of before."""
    for name in ("metrics.jsonl", "exit_code", "cancelled", "train.log"):
        (d / name).unlink(missing_ok=True)
    shutil.rmtree(d / "checkpoints", ignore_errors=True)


def submit(sweep: Sweep, planned: list[Planned], echo: Any = print) -> int:
    """Write and submit `planned` (job arrays per shape); returns how many were refused."""
    from xmoectl import local, runs, slurm

    refused = 0
    now = lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # noqa: E731
    for group in groups(planned):
        for p in group:
            _fresh_point_dir(p.job.run_dir)
            runs.write_run(p.job, p.script)
        scheduler = group[0].job.site.scheduler
        try:
            if scheduler == "local":  # one at a time: points must not share the machine
                for p in group:
                    job_id = local.start(p.job.run_dir, p.job.script_name)
                    _record_submission(sweep, p, job_id, scheduler, now())
                    echo(f"{p.name}: running here as {job_id}")
                    with open(os.devnull, "w") as sink:
                        state = local.follow(p.job.run_dir, job_id, out=sink)
                    final = refresh(sweep)[p.name]["final"] or {}
                    line = f"{p.name}: {state} {final.get('class', '')} {final.get('detail', '')}"
                    echo(line.rstrip())
                    if state == "CANCELLED":  # ctrl-C or `xmoectl cancel`: stop the sweep too
                        echo(f"{p.name} was cancelled; the rest waits for --resume")
                        return refused
                continue
            if len(group) == 1:
                ids = [slurm.submit(group[0].job, group[0].options)]
            else:
                scripts = [str(p.job.run_dir / p.job.script_name) for p in group]
                opts = [
                    (k, f"xmoe-{sweep.name}" if k == "job-name" else v) for k, v in group[0].options
                ]
                ids = slurm.submit_array(sweep.dir / "submitit", scripts, opts)
        except UserError as e:
            refused += len(group)
            for p in group:
                sweep.append({"point": p.name, "event": "submitted", "job_id": None})
                sweep.append({"point": p.name, "event": "final", "job_id": None,
                              "state": "REFUSED", "class": "other", "detail": str(e)})  # fmt: skip
            echo(f"{', '.join(p.name for p in group)}: {e}")
            continue
        for p, job_id in zip(group, ids):
            if len(group) > 1:  # `xmoectl logs <point>` finds the array task's log through this
                link = p.job.run_dir / "submitit" / f"{job_id}_0_log.out"
                link.parent.mkdir(exist_ok=True)
                link.unlink(missing_ok=True)
                link.symlink_to(sweep.dir / "submitit" / f"{job_id}_0_log.out")
            _record_submission(sweep, p, job_id, scheduler, now())
        how = f"array of {len(group)}" if len(group) > 1 else "job"
        echo(f"{how} {ids[0].split('_')[0]}: {', '.join(p.name for p in group)}")
    return refused


def _record_submission(sweep: Sweep, p: Planned, job_id: str, scheduler: str, when: str) -> None:
    from xmoectl import runs

    runs.update_manifest(p.job.run_dir, job_id=job_id, submitted=when, sweep=sweep.name)
    sweep.append({"point": p.name, "event": "submitted", "job_id": job_id, "scheduler": scheduler})


def to_resubmit(sweep: Sweep) -> list[str]:
    """Points never submitted, or whose last attempt ended in anything but success."""
    st = refresh(sweep)
    return [
        name
        for name, s in st.items()
        if s["job_id"] is None or (s["final"] is not None and s["final"]["class"] != "ok")
    ]


# --------------------------------------------------------------------------- state


def _own_logs(run_dir: Path, job_id: str, scheduler: str) -> list[Path]:
    """This attempt's log only: a resubmitted point keeps the logs of its earlier attempts."""
    from xmoectl import local

    if scheduler == "local":
        files = [run_dir / local.LOG]
    else:
        files = [run_dir / "submitit" / f"{job_id}_0_log.out", run_dir / f"slurm-{job_id}.out"]
    return [f for f in files if f.is_file()]


def _read_logs(run_dir: Path, job_id: str, scheduler: str, limit: int = 2_000_000) -> str:
    text = []
    for f in _own_logs(run_dir, job_id, scheduler):
        with f.open("rb") as fh:
            fh.seek(max(0, f.stat().st_size - limit))
            text.append(fh.read().decode(errors="replace"))
    return "\n".join(text)


def _job_state(run_dir: Path, job_id: str, scheduler: str) -> dict[str, str]:
    from xmoectl import local, slurm

    if scheduler == "local":
        return local.job_state(run_dir, job_id)
    return slurm.job_state(job_id)


def _last_progress(run_dir: Path, job_id: str, scheduler: str) -> float | None:
    files = [run_dir / "metrics.jsonl", *_own_logs(run_dir, job_id, scheduler)]
    times = [f.stat().st_mtime for f in files if f.exists()]
    return max(times) if times else None


def refresh(sweep: Sweep) -> dict[str, dict[str, Any]]:
    """Ask the scheduler about every point without a final result; record the finished ones.

    Adds `state` (the scheduler's) and `live` (a running point's hang suspicion, if any) to
    each point of `Sweep.state()`.
    """
    from xmoectl import classify, runs
    from xmoectl.report import summarize
    from xmoectl.slurm import TERMINAL

    st = sweep.state()
    deadline = float(sweep.spec.get("hang_timeout_s") or 0)
    for name, s in st.items():
        s["live"] = None
        if s["final"] is not None:
            s["state"] = s["final"]["state"]
            continue
        if s["job_id"] is None:
            s["state"] = "NOT SUBMITTED"
            continue
        d = sweep.point_dir(name)
        sched = s.get("scheduler") or "slurm"
        info = _job_state(d, s["job_id"], sched)
        s["state"] = info["state"]
        if info["state"] in TERMINAL:
            metrics = runs.read_metrics(d)
            outcome = classify.classify(
                info["state"], _read_logs(d, s["job_id"], sched), has_metrics=bool(metrics)
            )
            rec = {
                "point": name, "event": "final", "job_id": s["job_id"], "state": info["state"],
                "class": outcome.cls, "detail": outcome.detail, "elapsed": info.get("elapsed", ""),
                "summary": summarize(metrics),
            }  # fmt: skip
            sweep.append(rec)
            s["final"] = {"time": time.time(), **rec}
        elif info["state"] == "RUNNING":
            last = _last_progress(d, s["job_id"], sched)
            if last is not None:
                s["live"] = classify.stalled(time.time() - last, deadline)
    return st


def describe(planned: list[Planned], echo: Any = print) -> None:
    """Every job the sweep would submit, with its points: what `--dry-run` prints."""
    from xmoectl.report import layout_label

    for i, group in enumerate(groups(planned), 1):
        opts = " ".join(
            f"--{k}" if v is True else f"--{k}={v}"
            for k, v in group[0].options
            if k not in ("job-name", "output")
        )
        how = f"array of {len(group)}" if len(group) > 1 else "single job"
        echo(f"job {i} ({how}): sbatch {opts}")
        for p in group:
            rec = p.record()
            echo(
                f"  {p.name:<28} nodes {p.nodes:<3} ranks {rec['world_size']:<4} "
                f"{layout_label(rec['layout'])}  global batch {rec['layout']['global_batch']}"
            )
            echo(
                f"    --set {' --set '.join(p.overrides)}" if p.overrides else "    (preset as is)"
            )


def start(
    spec: dict[str, Any], root: Path, name: str, dry_run: bool = False, echo: Any = print
) -> Sweep | None:
    """Check the whole grid, then (unless dry_run) write the sweep and submit every point."""
    from xmoectl.runs import check_name

    path = Path(root) / check_name(name)
    if (path / SWEEP_FILE).exists():
        raise UserError(f"sweep {path} already exists: pick another --name, or --resume it")
    skipped: list[dict[str, Any]] | None = [] if spec.get("skip_invalid") else None
    planned = plan(spec, path, skipped)
    n, jobs = len(planned), len(groups(planned))
    head = f"sweep {name}: {n} point{'s' * (n != 1)}, {jobs} job{'s' * (jobs != 1)}"
    head += f", {spec['mode']} scaling"
    for sk in skipped or []:
        echo(f"skipped {sk['name']}: {sk['reason']}")
    if dry_run:
        echo(head + "; nothing submitted (--dry-run)")
        describe(planned, echo)
        return None
    sw = Sweep.create(path, spec, planned, skipped or [])
    echo(f"{head}\nsweep directory: {sw.dir}")
    submit(sw, planned, echo)
    return sw


def resume(sw: Sweep, dry_run: bool = False, echo: Any = print) -> list[str]:
    """Resubmit the points that are missing or failed; returns their names."""
    names = to_resubmit(sw)
    if not names:
        echo(f"sweep {sw.name}: nothing to resubmit (every point is done, queued or running)")
        return []
    skipped = [] if sw.spec.get("skip_invalid") else None
    planned = [p for p in plan(sw.spec, sw.dir, skipped) if p.name in names]
    echo(f"sweep {sw.name}: resubmitting {len(planned)} of {len(sw.points)} points")
    if dry_run:
        describe(planned, echo)
    else:
        submit(sw, planned, echo)
    return names
