"""A run resolved against a site, and the job script rendered from it.

`resolve` checks everything (site, model, overrides, parallel layout, command-line values)
before anything is written; `render_script` turns the result into the standalone sbatch
script (Slurm sites) or run script (`local`) through the jinja2 templates. `submit` runs
this very file, so what a person reads is what the cluster runs.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmoectl import UserError, shell
from xmoectl.runs import check_name
from xmoectl.sites import SiteProfile, check_slurm_value

# the trainer's checkpoint-and-requeue signal; NCCL may use USR1 itself
REQUEUE_SIGNAL = "USR2"


@dataclass
class Job:
    """Everything the templates and the submitters need to start one run."""

    site: SiteProfile
    model: str
    config: Any  # xmoe.config.Config
    nodes: int
    tasks_per_node: int
    run_dir: Path
    name: str
    time_min: int
    account: str = ""
    partition: str = ""
    qos: str = ""
    python: str = ""  # interpreter that runs the trainer
    bindir: str = ""  # the built environment's bin folder, put first on PATH ("" = as is)
    resume: bool = False
    force: bool = False  # start over in a run directory that already holds metrics
    peak_tflops: float = 0.0
    overrides: list[str] = field(default_factory=list)
    plan: dict[str, Any] | None = None  # the planner's record (plan.json), GPU sites only

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def script_name(self) -> str:
        return "run.sh" if self.site.scheduler == "local" else "job.sbatch"


def parse_time(text: str) -> int:
    """Slurm's time formats ([D-]HH:MM:SS, MM, MM:SS, D-HH, D-HH:MM) as whole minutes."""
    check_slurm_value(text, "--time")
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise UserError(f"--time {text!r} must look like HH:MM:SS, D-HH:MM:SS or minutes")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is None:
        if b is None:
            secs = a * 60
        elif c is None:
            secs = a * 60 + b
        else:
            secs = a * 3600 + b * 60 + c
    else:
        secs = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    return max(1, math.ceil(secs / 60))


def local_accelerators() -> tuple[str, int]:
    """(platform, count) of this machine's GPUs, asked of the vendor tools, not of torch."""
    for platform, cmd, pattern in (
        ("cuda", ["nvidia-smi", "-L"], r"^GPU \d+"),
        ("rocm", ["rocm-smi", "--showid"], r"^GPU\[\d+\]"),
    ):
        if shutil.which(cmd[0]):
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
            except (OSError, subprocess.TimeoutExpired):
                continue
            ids = {line.split()[0] for line in out.splitlines() if re.match(pattern, line)}
            if ids:
                return platform, len(ids)
    return "cpu", 0


def env_paths(site: SiteProfile, prefix: str) -> tuple[str, str]:
    """(python, bindir) of the environment at `prefix`; without one, the current interpreter."""
    if not prefix:
        return sys.executable, ""
    sub = "conda" if site.python.manager == "conda" else "venv"
    bindir = f"{prefix.rstrip('/')}/{sub}/bin"
    return f"{bindir}/python", bindir


def resolve(
    site: SiteProfile,
    model: str,
    nodes: int,
    run_dir: Path,
    *,
    overrides: tuple[str, ...] | list[str] = (),
    time: str = "",
    account: str = "",
    partition: str = "",
    qos: str = "",
    tasks_per_node: int = 0,
    env_prefix: str | None = None,
    resume: bool = False,
    force: bool = False,
) -> Job:
    """Check and assemble a run; raises UserError/ConfigError (one line) on bad input."""
    from xmoe.config import load_config, validate_layout

    if nodes < 1:
        raise UserError(f"--nodes {nodes} must be >= 1")
    name = check_name(run_dir.name)
    for value, what in ((account, "--account"), (partition, "--partition"), (qos, "--qos")):
        check_slurm_value(value, what)
    time_min = parse_time(time or site.slurm.time)
    grace = site.slurm.requeue_grace_s
    if site.scheduler == "slurm" and grace and grace >= time_min * 60:
        raise UserError(
            f"--time {time or site.slurm.time} is not longer than the requeue warning "
            f"(slurm.requeue_grace_s={grace} s of site {site.name}): ask for more time"
        )
    if site.scheduler == "local":
        if nodes != 1:
            raise UserError(f"site {site.name!r} runs on this machine only: use --nodes 1")
        gpus = site.node.gpus or local_accelerators()[1]
        tpn = tasks_per_node or gpus or site.slurm.tasks_per_node
    else:
        tpn = tasks_per_node or site.slurm.tasks_per_node
        if site.node.gpus and tpn > site.node.gpus:
            raise UserError(
                f"--tasks-per-node {tpn} exceeds the {site.node.gpus} accelerators per node of {site.name}"
            )
    cfg = load_config(model, list(overrides))
    # the planner picks the layout fields the user did not fix (GPU sites only); a resumed
    # run keeps the layout recorded in its plan.json
    from xmoectl.planner import load_recorded_plan, plan_for_submit

    previous = load_recorded_plan(run_dir) if resume else None
    planned, plan = plan_for_submit(cfg, site, nodes, tpn, overrides, model, previous)
    if planned:
        cfg = load_config(model, [*overrides, *planned])
    validate_layout(cfg, nodes * tpn)
    prefix = site.python.prefix if env_prefix is None else env_prefix
    python, bindir = env_paths(site, prefix)
    peak = cfg.train.peak_tflops or site.node.peak_tflops_bf16
    return Job(
        site=site,
        model=model,
        config=cfg,
        nodes=nodes,
        tasks_per_node=tpn,
        run_dir=run_dir.resolve(),
        name=name,
        time_min=time_min,
        account=account or site.slurm.account,
        partition=partition or site.slurm.partition,
        qos=qos or site.slurm.qos,
        python=python,
        bindir=bindir,
        resume=resume,
        force=force and not resume,
        peak_tflops=peak,
        overrides=list(overrides),
        plan=plan,
    )


# --------------------------------------------------------------------------- Slurm options


def _split_option(line: str) -> tuple[str, Any]:
    body = line[2:]
    if "=" in body:
        key, value = body.split("=", 1)
        return key, value
    if " " in body:
        key, value = body.split(" ", 1)
        return key, value.strip()
    return body, True


def sbatch_options(job: Job) -> list[tuple[str, Any]]:
    """The job's `#SBATCH` options, in order; the script and submitit both take them from here."""
    s = job.site
    per_node_tasks = 1 if s.launcher == "torchrun" else job.tasks_per_node
    opts: list[tuple[str, Any]] = [
        ("job-name", f"xmoe-{job.name}"),
        ("nodes", job.nodes),
        ("ntasks-per-node", per_node_tasks),
        ("time", job.time_min),
    ]
    if s.srun.cpus_per_task:
        opts.append(("cpus-per-task", s.srun.cpus_per_task))
    for key, value in (
        ("account", job.account),
        ("partition", job.partition),
        ("qos", job.qos),
        ("constraint", s.slurm.constraint),
    ):
        if value:
            opts.append((key, value))
    if s.slurm.gpus_per_node:
        opts.append(("gpus-per-node", s.slurm.gpus_per_node))
    if s.slurm.core_spec:
        opts.append(("core-spec", s.slurm.core_spec))
    opts.append(("output", str(job.run_dir / "slurm-%j.out")))
    # sent to the job steps (the ranks), not the batch shell: the trainer checkpoints on it
    if s.slurm.requeue_grace_s:
        opts.append(("signal", f"{REQUEUE_SIGNAL}@{s.slurm.requeue_grace_s}"))
    opts.append(("requeue", True))
    opts.append(("open-mode", "append"))  # a requeued job keeps the same log file: append to it
    opts += [_split_option(line) for line in s.slurm.extra_sbatch]
    return opts


def srun_args(job: Job) -> list[str]:
    s = job.site.srun
    args = []
    if s.cpus_per_task:
        args.append(f"--cpus-per-task={s.cpus_per_task}")
    if s.gpus_per_task:
        args.append(f"--gpus-per-task={s.gpus_per_task}")
    elif job.site.launcher == "torchrun" and job.site.node.gpus:
        args.append(f"--gpus-per-task={job.tasks_per_node}")
    if s.gpu_bind:
        args.append(f"--gpu-bind={s.gpu_bind}")
    return args + list(s.extra)


def trainer_args(job: Job) -> list[str]:
    args = ["--config", str(job.run_dir / "config.yaml"), "--run-dir", str(job.run_dir)]
    if job.resume:
        args.append("--resume")
    elif job.force:
        args.append("--force")
    if job.peak_tflops:
        args += ["--peak-tflops", f"{job.peak_tflops:g}"]
    return args


def environment_context(site: SiteProfile, bindir: str) -> dict[str, Any]:
    """What the shared environment block (modules, Python, variables, caches) needs."""
    return {
        "modules": list(site.modules),
        "bindir": bindir,
        "env": list(site.env.items()),
        "caches": list(site.caches.items()),
    }


def render_script(job: Job) -> str:
    """The standalone job script: `job.sbatch` for Slurm sites, `run.sh` for `local`."""
    ctx = environment_context(job.site, job.bindir)
    ctx.update(
        run_dir=str(job.run_dir),
        launcher=job.site.launcher,
        nodes=job.nodes,
        tasks_per_node=job.tasks_per_node,
        srun_args=srun_args(job),
        python=job.python,
        trainer_args=trainer_args(job),
        interface=job.site.rendezvous.interface,
        port=job.site.rendezvous.port,
        sbatch=sbatch_options(job),
        requeue_signal=REQUEUE_SIGNAL,
        max_restarts=job.site.slurm.max_restarts,
        requeue_grace_s=job.site.slurm.requeue_grace_s,
    )
    if job.site.scheduler == "local":
        return shell.render("run_local.sh.j2", **ctx)
    return shell.render("job.sbatch.j2", **ctx)
