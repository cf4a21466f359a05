"""Slurm sites: submission through submitit, job state from squeue/sacct, cancellation.

Submission: submitit's SlurmExecutor owns sbatch (job id, its own log folder, the pickled
submission). The options come from `render.sbatch_options`, the very list that writes the
`#SBATCH` lines of the standalone `job.sbatch`, and the job submitit runs on the first node
is `bash job.sbatch`: the rendered setup and launch blocks themselves, with its `#SBATCH`
lines read as comments. There is a single source for what runs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from xmoectl import UserError

# sbatch options that submitit writes itself from named parameters
_NAMED = {
    "job-name": "job_name",
    "nodes": "nodes",
    "ntasks-per-node": "ntasks_per_node",
    "time": "time",
    "cpus-per-task": "cpus_per_task",
    "partition": "partition",
    "qos": "qos",
    "constraint": "constraint",
    "account": "account",
    "gpus-per-node": "gpus_per_node",
}
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}


class ScriptJob:
    """What submitit runs in the batch step: the run's rendered job script, with bash."""

    def __init__(self, script: str) -> None:
        self.script = script

    def __call__(self) -> int:
        # A requeued job's earlier instance can be killed by `scontrol requeue` while submitit
        # writes its result; the half-written temporary file would then make submitit refuse
        # to save this instance's result and mark a completed run FAILED.
        import submitit

        result = submitit.JobEnvironment().paths.result_pickle
        result.with_suffix(result.suffix + ".save_tmp").unlink(missing_ok=True)
        rc = subprocess.call(["bash", self.script])
        if rc:
            raise RuntimeError(f"{self.script} exited with status {rc}")
        return rc


def executor_parameters(options: list[tuple[str, Any]]) -> dict[str, Any]:
    """submitit SlurmExecutor parameters equivalent to the rendered `#SBATCH` options."""
    params: dict[str, Any] = {"stderr_to_stdout": True, "use_srun": False, "wckey": None}
    extra: dict[str, Any] = {}
    for key, value in options:
        if key == "output":  # submitit keeps the log in its own folder
            continue
        if key in _NAMED:
            params[_NAMED[key]] = value
        else:
            extra[key.replace("-", "_")] = value
    if extra:
        params["additional_parameters"] = extra
    return params


@contextlib.contextmanager
def _sbatch_refusals():
    """Turn a refused sbatch into one UserError line; its complaints would reach the terminal."""
    with tempfile.TemporaryFile() as err:
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            yield
        except Exception as e:  # sbatch refused: no partition, bad account, Slurm down...
            failure = e
        else:
            failure = None
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        if failure is not None:
            err.seek(0)
            lines = [
                ln.strip() for ln in err.read().decode(errors="replace").splitlines() if ln.strip()
            ]
            lines = lines or str(failure).strip().splitlines() or [type(failure).__name__]
            raise UserError(f"sbatch refused the job: {lines[-1]}")


def submit(job: Any, options: list[tuple[str, Any]]) -> str:
    """Submit the run's job.sbatch through submitit; returns the Slurm job id."""
    import submitit

    folder = job.run_dir / "submitit"
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
    executor.update_parameters(**executor_parameters(options))
    with _sbatch_refusals():
        sjob = executor.submit(ScriptJob(str(job.run_dir / job.script_name)))
    return str(sjob.job_id)


def submit_array(folder: Path, scripts: list[str], options: list[tuple[str, Any]]) -> list[str]:
    """Submit job scripts that share one shape (same `options`) as one Slurm job array.

    Returns the task ids (`<array id>_<index>`, in the order of `scripts`); each task's log
    is `folder/<task id>_0_log.out`. A single script is submitted as a plain job.
    """
    import submitit

    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
    executor.update_parameters(**executor_parameters(options))
    with _sbatch_refusals():
        with executor.batch():  # submitted as one array when the block ends
            sjobs = [executor.submit(ScriptJob(s)) for s in scripts]
    return [str(j.job_id) for j in sjobs]


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout if out.returncode == 0 else ""


def job_state(job_id: str) -> dict[str, str]:
    """State, elapsed time and exit code; squeue for live jobs, sacct after (exact with slurmdbd)."""
    line = _run(["squeue", "-h", "-j", job_id, "-o", "%T|%M|%R"]).strip()
    if line:
        state, elapsed, reason = (line.split("|") + ["", ""])[:3]
        return {"state": state, "elapsed": elapsed, "reason": reason}
    rows = _run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,Elapsed,ExitCode"]).strip()
    if rows:
        state, elapsed, exit_code = (rows.splitlines()[0].split("|") + ["", ""])[:3]
        # "CANCELLED by 0" -> CANCELLED
        return {
            "state": state.split()[0] if state else "UNKNOWN",
            "elapsed": elapsed,
            "exit_code": exit_code,
        }
    return {"state": "UNKNOWN", "elapsed": ""}


def cancel(job_id: str) -> None:
    out = subprocess.run(["scancel", job_id], capture_output=True, text=True, timeout=30)
    if out.returncode:
        raise UserError(f"scancel {job_id} failed: {out.stderr.strip() or out.returncode}")


def log_files(run_dir: Path, job_id: str | None) -> list[Path]:
    """The job's log (submitit folder, or slurm-<id>.out for a by-hand sbatch)."""
    found = []
    if job_id:
        found += [run_dir / "submitit" / f"{job_id}_0_log.out", run_dir / f"slurm-{job_id}.out"]
    found += sorted((run_dir / "submitit").glob("*_log.out")) + sorted(run_dir.glob("slurm-*.out"))
    seen, out = set(), []
    for p in found:
        if p.is_file() and p not in seen:
            seen.add(p)
            out.append(p)
    return out
