"""The `local` site: run the rendered run.sh on this machine and follow it live.

The run is its own session writing to `train.log`, so it outlives the terminal that started
it; following is reading that log. Its job id is `local-<pid>`; run.sh records its exit
status in `exit_code`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from xmoectl import UserError

LOG = "train.log"
CANCELLED = "cancelled"


def start(run_dir: Path, script: str) -> str:
    """Start `bash run.sh` detached; returns the job id."""
    (run_dir / "exit_code").unlink(missing_ok=True)
    (run_dir / CANCELLED).unlink(missing_ok=True)
    with (run_dir / LOG).open("ab") as log:
        proc = subprocess.Popen(
            ["bash", str(run_dir / script)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    # wait for the exec, so that the pid is recognisably this run's from now on
    deadline = time.monotonic() + 5
    while proc.poll() is None and not _alive(proc.pid, run_dir) and time.monotonic() < deadline:
        time.sleep(0.01)
    return f"local-{proc.pid}"


def _pid(job_id: str) -> int:
    try:
        return int(job_id.removeprefix("local-"))
    except ValueError:
        raise UserError(f"{job_id!r} is not a local job id") from None


def _alive(pid: int, run_dir: Path) -> bool:
    """The pid runs and is still our run.sh (pids are reused; an exited child is a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        try:  # reap it when it is our own child
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return False
    return str(run_dir) in cmdline


def job_state(run_dir: Path, job_id: str) -> dict[str, str]:
    code_file = run_dir / "exit_code"
    if _alive(_pid(job_id), run_dir):
        return {"state": "RUNNING", "elapsed": ""}
    if (run_dir / CANCELLED).is_file():  # the trainer may stop cleanly (status 0) on SIGTERM
        return {"state": "CANCELLED", "elapsed": ""}
    if code_file.is_file():
        code = code_file.read_text().strip()
        if code == "0":
            return {"state": "COMPLETED", "elapsed": "", "exit_code": code}
        # 128 + SIGTERM/SIGINT: stopped by `xmoectl cancel` or ctrl-C
        state = "CANCELLED" if code in ("130", "143") else "FAILED"
        return {"state": state, "elapsed": "", "exit_code": code}
    return {"state": "CANCELLED", "elapsed": ""}


def cancel(run_dir: Path, job_id: str) -> None:
    pid = _pid(job_id)
    if _alive(pid, run_dir):
        (run_dir / CANCELLED).write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
        os.killpg(pid, signal.SIGTERM)


def follow(run_dir: Path, job_id: str, out: Any = None, poll_s: float = 0.2) -> str:
    """Print the run's log as it grows until the run ends; returns the final state."""
    out = out or sys.stdout
    log = run_dir / LOG
    pos = 0
    try:
        while True:
            done = not _alive(_pid(job_id), run_dir)
            if log.is_file():
                with log.open("rb") as f:
                    f.seek(pos)
                    chunk = f.read()
                    pos += len(chunk)
                if chunk:
                    out.write(chunk.decode(errors="replace"))
                    out.flush()
            if done:
                return job_state(run_dir, job_id)["state"]
            time.sleep(poll_s)
    except KeyboardInterrupt:  # ctrl-C while following stops the run, as in a plain terminal
        cancel(run_dir, job_id)
        return "CANCELLED"
