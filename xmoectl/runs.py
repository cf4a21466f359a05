"""Run directories: where a run's config, job script, manifest, logs and metrics live.

runs/<model>-<site>-<UTC timestamp>/      (or --name)
    config.yaml     the resolved config the trainer gets with --config
    plan.json       the planner's ranked layouts and the chosen one (GPU sites)
    job.sbatch      the standalone job script (run.sh on the local site)
    manifest.json   xmoe version, git SHA, site, command line, time, job id
    metrics.jsonl   written by the trainer, one JSON line per logged step
    submitit/       submitit's files and the job log (Slurm sites); train.log (local)
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from xmoectl import UserError, source_tree

MANIFEST = "manifest.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")


def check_name(name: str) -> str:
    """Run names become folder names and job names: a safe, flat subset."""
    if not _NAME.match(name):
        raise UserError(f"run name {name!r} may hold only letters, digits, '.', '_' and '-'")
    return name


def runs_root(runs_dir: str | None = None) -> Path:
    """--runs-dir, else $XMOE_RUNS, else ./runs."""
    return Path(runs_dir or os.environ.get("XMOE_RUNS") or "runs")


def default_name(model: str, site: str) -> str:
    stem = Path(model).stem if model.endswith((".yaml", ".yml")) else model
    return f"{stem}-{site}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def claim(run_dir: Path, *, force: bool = False, resume: bool = False) -> None:
    """Refuse to reuse a run directory unless the user said so (checked before any write)."""
    if resume:
        if not (run_dir / MANIFEST).is_file():
            raise UserError(f"--resume: {run_dir} is not a run directory (no {MANIFEST})")
        return
    if run_dir.exists() and any(run_dir.iterdir()) and not force:
        raise UserError(
            f"run directory {run_dir} already exists: pick another --name, or --resume / --force"
        )


def git_info(root: Path | None) -> dict[str, Any]:
    root = root or Path.cwd()
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if sha.returncode:
            return {"git_sha": None}
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return {"git_sha": sha.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        return {"git_sha": None}


def make_manifest(job: Any, argv: list[str] | None = None) -> dict[str, Any]:
    import xmoe

    info = {
        "name": job.name,
        "xmoe_version": xmoe.__version__,
        **git_info(source_tree()),
        "site": job.site.name,
        "site_file": job.site.source,
        "scheduler": job.site.scheduler,
        "launcher": job.site.launcher,
        "model": job.model,
        "overrides": job.overrides,
        "nodes": job.nodes,
        "tasks_per_node": job.tasks_per_node,
        "world_size": job.world_size,
        "command_line": shlex.join(argv if argv is not None else sys.argv),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "script": job.script_name,
        "job_id": None,
    }
    try:  # parameter and FLOP counts (torch-free arithmetic), informative only
        from xmoe import flops

        info["params"] = flops.param_counts(job.config)
        info["flops_per_token"] = flops.flops_per_token(job.config)
    except (ImportError, AttributeError):
        pass
    return info


def write_run(job: Any, script: str, argv: list[str] | None = None) -> Path:
    """Write config, script and manifest; the directory must have been claimed already."""
    d = job.run_dir
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(job.config.to_yaml())
    if getattr(job, "plan", None):
        (d / "plan.json").write_text(json.dumps(job.plan, indent=2) + "\n")
    path = d / job.script_name
    path.write_text(script)
    path.chmod(0o755)
    manifest = read_manifest(d) if job.resume and (d / MANIFEST).is_file() else {}
    history = manifest.get("history", [])
    if manifest.get("job_id"):
        history.append({"job_id": manifest["job_id"], "created": manifest.get("created")})
    fresh = make_manifest(job, argv)
    if history:
        fresh["history"] = history
    write_manifest(d, fresh)
    return d


def read_manifest(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{run_dir}: unreadable {MANIFEST} ({e})") from None


def write_manifest(run_dir: Path, data: dict[str, Any]) -> None:
    tmp = run_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(run_dir / MANIFEST)


def update_manifest(run_dir: Path, **fields: Any) -> dict[str, Any]:
    data = read_manifest(run_dir)
    data.update(fields)
    write_manifest(run_dir, data)
    return data


def all_runs(root: Path) -> list[Path]:
    """Run directories under `root`, oldest first (by manifest creation time)."""
    if not root.is_dir():
        return []
    found = [p.parent for p in root.glob(f"*/{MANIFEST}")]
    return sorted(found, key=lambda p: ((p / MANIFEST).stat().st_mtime, p.name))


def find_run(ref: str | None, root: Path) -> Path:
    """A run by directory path, by name under `root`, or by job id; None = the newest."""
    if ref is None:
        runs = all_runs(root)
        if not runs:
            raise UserError(f"no runs under {root}: start one with `xmoectl submit`")
        return runs[-1]
    p = Path(ref)
    if (p / MANIFEST).is_file():
        return p
    if (root / ref / MANIFEST).is_file():
        return root / ref
    for d in all_runs(root):
        try:
            if str(read_manifest(d).get("job_id")) == ref:
                return d
        except UserError:
            continue
    raise UserError(f"no run {ref!r} (not a run directory, a name under {root}, or a job id)")


def last_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The last complete line of the trainer's metrics.jsonl (read from the end)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 65536))
        lines = f.read().splitlines()
    for raw in reversed(lines):
        try:
            data = json.loads(raw)
        except ValueError:
            continue
        if isinstance(data, dict):
            return data
    return None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    out = []
    if path.is_file():
        for raw in path.read_text().splitlines():
            try:
                data = json.loads(raw)
            except ValueError:
                continue
            if isinstance(data, dict):
                out.append(data)
    return out


def format_metrics(m: dict[str, Any] | None) -> str:
    if not m:
        return "no metrics yet"
    parts = []
    for key in ("step", "loss", "tokens_per_s", "mfu"):
        if key in m:
            v = m[key]
            if v is None:
                continue
            parts.append(f"{key}={v:.4g}" if isinstance(v, float) else f"{key}={v}")
    return " ".join(parts) or json.dumps(m)[:120]
