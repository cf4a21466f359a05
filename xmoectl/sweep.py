"""Scaling sweeps: a grid of runs over node counts and config values, and its results store.

This module expands and checks the grid (`plan`) and keeps the store (`Sweep`);
`sweep_run` submits and follows the points, `classify` names failures, `report` draws.

A sweep is one folder under the runs directory:

    <sweep>/
        sweep.json      the grid as asked (site, model, nodes, --vary axes, weak/strong, ...)
                        and every point (name, nodes, series, overrides, layout)
        results.jsonl   append-only: each submission and each point's final result
        points/<point>/ an ordinary run directory per point (config, job script, manifest,
                        metrics.jsonl, log); `xmoectl status|logs <dir>` work on it
        submitit/       submitit's files of the job arrays
        report.md, report.json, throughput.png, efficiency.png, memory.png  (`report`)

The store survives restarts of the CLI: every fact is one appended line, read back and
folded per point (the last submission of a point wins), so `status`, `report` and
`--resume` can run any time later, from another shell, after the login node rebooted.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmoectl import UserError

SWEEP_FILE = "sweep.json"
RESULTS_FILE = "results.jsonl"
POINTS_DIR = "points"

# --vary shorthands: name -> (config key, value spellings); any `section.key` works as well
SHORTHANDS: dict[str, tuple[str, dict[str, str]]] = {
    "rbd": ("moe.dispatcher", {"on": "rbd", "off": "pft"}),
    "dispatcher": ("moe.dispatcher", {}),
    "tp": ("parallel.tp", {}),
    "ep": ("parallel.ep", {}),
    "ssmb": ("parallel.ssmb", {"on": "true", "off": "false"}),
    "zero": ("parallel.zero_stage", {}),
    "micro_batch": ("train.micro_batch", {}),
    "capacity_factor": ("moe.capacity_factor", {}),
}
MODES = ("weak", "strong")


@dataclass(frozen=True)
class Axis:
    """One `--vary` argument: a config key and the values the sweep tries."""

    name: str  # as written: `rbd` or `moe.dispatcher`
    key: str  # the config key it sets
    values: tuple[str, ...]
    spellings: tuple[tuple[str, str], ...] = ()

    def override(self, value: str) -> str:
        return f"{self.key}={dict(self.spellings).get(value, value)}"


def parse_nodes(text: str, flag: str = "--nodes") -> list[int]:
    """`1,2,4,8` -> [1, 2, 4, 8]: distinct positive counts, ascending."""
    try:
        nodes = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UserError(
            f"{flag} {text!r} must be counts separated by commas, e.g. 1,2,4,8"
        ) from None
    if not nodes or min(nodes) < 1:
        raise UserError(f"{flag} {text!r} must be counts >= 1, e.g. 1,2,4,8")
    if len(set(nodes)) != len(nodes):
        raise UserError(f"{flag} {text!r} names a count twice")
    return sorted(nodes)


def parse_vary(items: list[str] | tuple[str, ...]) -> list[Axis]:
    """`rbd=on,off`, `parallel.tp=1,2`: known shorthands or `section.key`, values checked later."""
    axes: list[Axis] = []
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip()
        values = tuple(v.strip() for v in raw.split(",") if v.strip())
        if not sep or not name or not values:
            raise UserError(f"--vary {item!r} must look like KEY=V1,V2 (e.g. rbd=on,off)")
        if len(set(values)) != len(values):
            raise UserError(f"--vary {item!r} names a value twice")
        if name in SHORTHANDS:
            key, spellings = SHORTHANDS[name]
            if spellings and not set(values) <= set(spellings):
                raise UserError(
                    f"--vary {item!r}: {name} takes {' or '.join(spellings)}, got {raw!r}"
                )
        elif name.count(".") == 1:
            key, spellings = name, {}
        else:
            raise UserError(
                f"--vary {item!r}: unknown key {name!r}; use section.key (e.g. moe.top_k) "
                f"or one of {', '.join(SHORTHANDS)}"
            )
        if any(a.key == key for a in axes):
            raise UserError(f"--vary {item!r}: {key} is varied twice")
        axes.append(Axis(name, key, values, tuple(spellings.items())))
    return axes


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_") or "x"


@dataclass
class Planned:
    """One point of the grid, resolved into a job (not yet written or submitted)."""

    name: str
    nodes: int
    series: str  # the varied settings, "rbd=on tp=2" ("" without --vary)
    overrides: list[str]
    job: Any  # render.Job
    script: str
    options: list[tuple[str, Any]] = field(default_factory=list)  # sbatch options

    def record(self) -> dict[str, Any]:
        cfg = self.job.config
        tp, ep = cfg.parallel.tp, cfg.parallel.ep
        world = self.job.world_size
        return {
            "name": self.name,
            "nodes": self.nodes,
            "series": self.series,
            "overrides": self.overrides,
            "tasks_per_node": self.job.tasks_per_node,
            "world_size": world,
            "layout": {
                "tp": tp,
                "ep": ep,
                "dp": world // tp,
                "dispatcher": cfg.moe.dispatcher,
                "ssmb": cfg.parallel.ssmb,
                "micro_batch": cfg.train.micro_batch,
                "global_batch": cfg.train.global_batch,
                "zero_stage": cfg.parallel.zero_stage,
            },
        }


def partition_nodes(partition: str) -> int | None:
    """Nodes in the Slurm partition (the default one when ""), or None when sinfo cannot tell."""
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%P %D"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode:
        return None
    total = None
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            continue
        name = parts[0]
        if name.rstrip("*") == partition or (not partition and name.endswith("*")):
            total = (total or 0) + int(parts[1])
    return total


def sbatch_refusal(options: list[tuple[str, Any]]) -> str:
    """Why Slurm would refuse a job with these `#SBATCH` options (`sbatch --test-only`,
    which submits nothing); "" when it would take it, or when there is no sbatch to ask."""
    if not shutil.which("sbatch"):
        return ""
    args = ["sbatch", "--test-only"]
    args += [f"--{k}" if v is True else f"--{k}={v}" for k, v in options if k != "output"]
    try:
        out = subprocess.run([*args, "--wrap", "true"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    if out.returncode == 0:
        return ""
    lines = [ln.strip() for ln in (out.stderr + out.stdout).splitlines() if ln.strip()]
    return lines[-1] if lines else f"sbatch --test-only exited with status {out.returncode}"


def _batch_overrides(
    model: str, overrides: list[str], world: int, world0: int, mode: str
) -> list[str]:
    """Weak scaling keeps the sequences per GPU of the smallest point (the config's global
    batch over its GPUs), so the global batch grows with the GPUs; strong scaling keeps the
    config's global batch. The micro-batch shrinks to the largest divisor of the per-rank
    share only where the config's does not divide it."""
    from xmoe.config import load_config

    cfg = load_config(model, overrides)
    gb0, mb = cfg.train.global_batch, cfg.train.micro_batch
    gb = max(1, gb0 // world0) * world if mode == "weak" else gb0
    dp = max(1, world // cfg.parallel.tp)
    if gb % dp:
        raise UserError(
            f"--strong: train.global_batch={gb0} cannot be split over {dp} data-parallel ranks; "
            f"use a global batch that is a multiple of {dp}, or --weak"
        )
    out = [f"train.global_batch={gb}"]
    share = gb // dp
    if share % mb:
        mb = max(d for d in range(1, min(mb, share) + 1) if share % d == 0)
        out.append(f"train.micro_batch={mb}")
    return out


def _tasks_per_node(site: Any, spec: dict[str, Any]) -> list[int]:
    """Ranks per node as `render.resolve` will pick them; a list scales inside the node."""
    from xmoectl.render import local_accelerators

    given = spec.get("tasks_per_node")
    if given:
        return [int(given)] if isinstance(given, int) else [int(t) for t in given]
    if site.scheduler == "local":
        return [site.node.gpus or local_accelerators()[1] or site.slurm.tasks_per_node]
    return [site.slurm.tasks_per_node]


def plan(
    spec: dict[str, Any], sweep_dir: Path, skipped: list[dict[str, Any]] | None = None
) -> list[Planned]:
    """Every point of the grid in `spec`, checked and resolved; raises UserError (one line)
    naming the point on the first invalid one, before anything is written or submitted.

    With a `skipped` list, points that cannot run (RBD on one node, a TP size the heads do
    not allow at that scale...) are appended to it with the reason instead; a grid with no
    runnable point is still refused."""
    from xmoe.config import ConfigError
    from xmoectl import render
    from xmoectl import sites as S

    site = S.load(spec["site"])
    # a point that reaches its time limit is a finding, not a run to continue in a new job
    site = dataclasses.replace(site, slurm=dataclasses.replace(site.slurm, max_restarts=0))
    nodes = parse_nodes(",".join(str(n) for n in spec["nodes"]))
    axes = parse_vary(spec.get("vary") or [])
    if spec.get("mode", "weak") not in MODES:
        raise UserError(f"scale-test mode {spec.get('mode')!r} must be weak or strong")
    if site.scheduler == "slurm":
        have = partition_nodes(spec.get("partition") or site.slurm.partition)
        if have is not None and nodes[-1] > have:
            raise UserError(
                f"--nodes {nodes[-1]} does not fit: partition "
                f"{spec.get('partition') or site.slurm.partition or '(default)'} has {have} nodes"
            )
    base = list(spec.get("sets") or [])
    keys = {s.split("=", 1)[0].strip() for s in base}
    if spec.get("steps"):
        base.append(f"train.steps={spec['steps']}")
        if "train.log_interval" not in keys:  # several windows: the first holds the warm-up
            base.append(f"train.log_interval={max(1, int(spec['steps']) // 5)}")
    if spec.get("hang_timeout_s") and "train.hang_timeout_s" not in keys:
        base.append(f"train.hang_timeout_s={spec['hang_timeout_s']}")

    def resolve(name: str, n: int, tpn: int, overrides: list[str]) -> Any:
        try:
            return render.resolve(
                site, spec["model"], n, sweep_dir / POINTS_DIR / name, overrides=overrides,
                time=spec.get("time", ""), account=spec.get("account", ""),
                partition=spec.get("partition", ""), qos=spec.get("qos", ""),
                tasks_per_node=tpn,
                env_prefix=spec.get("env"), force=True,
            )  # fmt: skip
        except (UserError, ConfigError) as e:
            raise UserError(f"point {name}: {e}") from None

    planned: list[Planned] = []
    names: set[str] = set()
    tpns = _tasks_per_node(site, spec)
    world0 = nodes[0] * tpns[0]
    for combo in itertools.product(*(a.values for a in axes)):
        settings = [f"{a.name}={v}" for a, v in zip(axes, combo)]
        axis_sets = [a.override(v) for a, v in zip(axes, combo)]
        suffix = "".join(f"-{_slug(a.name.split('.')[-1])}_{_slug(v)}" for a, v in zip(axes, combo))
        for n, tpn in itertools.product(nodes, tpns):
            name = f"n{n}" + (f"x{tpn}" if len(tpns) > 1 else "") + suffix
            if name in names:
                raise UserError(f"two points are both named {name}: spell the --vary values apart")
            names.add(name)
            overrides = base + axis_sets
            try:
                try:
                    overrides += _batch_overrides(
                        spec["model"], overrides, n * tpn, world0, spec["mode"]
                    )
                except (UserError, ConfigError) as e:
                    raise UserError(f"point {name}: {e}") from None
                job = resolve(name, n, tpn, overrides)
            except UserError as e:
                if skipped is None:
                    raise
                skipped.append({"name": name, "nodes": n, "reason": str(e).split(": ", 1)[1]})
                continue
            planned.append(
                Planned(
                    name, n, " ".join(settings), overrides, job,
                    render.render_script(job), render.sbatch_options(job),
                )
            )  # fmt: skip
    if site.scheduler == "slurm":  # memory, account, QOS, constraints: asked of Slurm itself
        for group in groups(planned):
            why = sbatch_refusal(group[0].options)
            if not why:
                continue
            if skipped is None:
                raise UserError(f"point {group[0].name}: sbatch --test-only refuses it: {why}")
            skipped += [{"name": p.name, "nodes": p.nodes, "reason": why} for p in group]
            planned = [p for p in planned if p not in group]
    if not planned and skipped:
        first = skipped[0]
        raise UserError(f"no point of the grid can run; point {first['name']}: {first['reason']}")
    return planned


def group_key(p: Planned) -> str:
    """Points with the same sbatch options (up to their names and logs) share a job array."""
    opts = [(k, v) for k, v in p.options if k not in ("job-name", "output")]
    return json.dumps(opts, default=str)


def groups(planned: list[Planned]) -> list[list[Planned]]:
    out: dict[str, list[Planned]] = {}
    for p in planned:
        out.setdefault(group_key(p), []).append(p)
    return list(out.values())


# --------------------------------------------------------------------------- the store


class Sweep:
    """A sweep folder: its spec and points (sweep.json) and its append-only results store."""

    def __init__(self, path: Path) -> None:
        self.dir = Path(path)
        try:
            data = json.loads((self.dir / SWEEP_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{self.dir}: not a sweep (unreadable {SWEEP_FILE}: {e})") from None
        self.spec: dict[str, Any] = data["spec"]
        self.points: list[dict[str, Any]] = data["points"]
        self.skipped: list[dict[str, Any]] = data.get("skipped") or []  # points that cannot run

    @property
    def name(self) -> str:
        return self.dir.name

    @classmethod
    def create(
        cls,
        path: Path,
        spec: dict[str, Any],
        planned: list[Planned],
        skipped: list[dict[str, Any]] | None = None,
    ) -> Sweep:
        path = Path(path)
        if (path / SWEEP_FILE).exists():
            raise UserError(f"sweep {path} already exists: pick another --name, or --resume it")
        path.mkdir(parents=True, exist_ok=True)
        data = {"spec": spec, "points": [p.record() for p in planned], "skipped": skipped or []}
        tmp = path / (SWEEP_FILE + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path / SWEEP_FILE)
        return cls(path)

    def point_dir(self, name: str) -> Path:
        return self.dir / POINTS_DIR / name

    def append(self, record: dict[str, Any]) -> None:
        """One fact, flushed to disk before the next is written."""
        line = json.dumps({"time": time.time(), **record}, default=str)
        path = self.dir / RESULTS_FILE
        with path.open("a+b") as f:
            if f.tell():  # after a crash mid-line, start a new line rather than extend the torn one
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write((line + "\n").encode())
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> list[dict[str, Any]]:
        path = self.dir / RESULTS_FILE
        out = []
        if path.is_file():
            for raw in path.read_text().splitlines():
                try:
                    rec = json.loads(raw)
                except ValueError:  # a line cut short by a crash: the facts before it hold
                    continue
                if isinstance(rec, dict) and "point" in rec:
                    out.append(rec)
        return out

    def state(self) -> dict[str, dict[str, Any]]:
        """Per point: job_id, scheduler, attempts and the final result of its last submission."""
        st: dict[str, dict[str, Any]] = {
            p["name"]: {"job_id": None, "attempts": 0, "final": None} for p in self.points
        }
        for rec in self.records():
            cur = st.get(rec["point"])
            if cur is None:
                continue
            if rec.get("event") == "submitted":
                cur.update(job_id=rec["job_id"], scheduler=rec.get("scheduler"), final=None)
                cur["attempts"] += 1
            elif rec.get("event") == "final" and rec.get("job_id") == cur["job_id"]:
                cur["final"] = rec
        return st


def find(ref: str, root: Path) -> Sweep:
    """A sweep by folder path or by name under the runs directory."""
    for cand in (Path(ref), root / ref):
        if (cand / SWEEP_FILE).is_file():
            return Sweep(cand)
    raise UserError(f"no sweep {ref!r} (neither a sweep folder nor a name under {root})")


def default_name(model: str, site: str) -> str:
    stem = Path(model).stem if model.endswith((".yaml", ".yml")) else model
    return f"scale-{stem}-{Path(site).stem}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


# --------------------------------------------------------------------------- commands


def make_spec(
    site: str | None, nodes: str | None, model: str | None = None, weak: bool | None = None,
    vary: tuple[str, ...] = (), steps: int | None = None, sets: tuple[str, ...] = (),
    time: str | None = None, account: str | None = None, partition: str | None = None,
    qos: str | None = None, tasks_per_node: str | None = None, env: str | None = None,
    hang_timeout: float | None = None, skip_invalid: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """The grid as `scale-test run` options give it (what sweep.json keeps)."""
    if not site:
        raise UserError("scale-test needs --site (a site profile name or YAML file)")
    if not nodes:
        raise UserError("scale-test needs --nodes, e.g. --nodes 1,2,4,8")
    return {
        "site": site, "model": model or "tiny", "nodes": parse_nodes(nodes),
        "mode": "strong" if weak is False else "weak", "vary": list(vary), "steps": steps,
        "sets": list(sets), "time": time or "", "account": account or "",
        "partition": partition or "", "qos": qos or "", "tasks_per_node": parse_nodes(tasks_per_node, "--tasks-per-node") if tasks_per_node else 0,
        "env": env, "hang_timeout_s": 900.0 if hang_timeout is None else hang_timeout,
        "skip_invalid": skip_invalid,
    }  # fmt: skip
