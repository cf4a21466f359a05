"""Why a scale-test point ended the way it did, read from its job state and its log.

A sweep over many node counts fails in a few recurring ways, and each asks for a different
fix: out of memory (smaller micro-batch, more TP), a collective that timed out or a job
that stopped making progress (network, a dead rank), a non-finite loss (learning rate), a
node that died (resubmit), the time limit (more time or fewer steps), a cancellation. This
module names the class and the line of the log that shows it, so that a report can say
"n8-rbd_on: oom (torch.OutOfMemoryError: CUDA out of memory ...)" instead of "FAILED".

Pure functions over strings: the caller reads the Slurm state and the log files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

OK = "ok"
OOM = "oom"
HANG = "hang"
NAN = "nan"
NODE_FAILURE = "node_failure"
TIME_LIMIT = "time_limit"
CANCELLED = "cancelled"
OTHER = "other"
CLASSES = (OK, OOM, HANG, NAN, NODE_FAILURE, TIME_LIMIT, CANCELLED, OTHER)

# the trainer's exit codes (xmoe.train.reliability), as srun reports a rank's status
_EXIT_BAD_STEPS = 76
_EXIT_HANG = 77

# Log patterns per class, most specific first. CUDA and ROCm (HIP) wordings, the Linux OOM
# killer as Slurm reports it, NCCL/RCCL and gloo timeouts, our own watchdog and NaN stop.
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        OOM,
        re.compile(
            r"OutOfMemoryError|CUDA out of memory|HIP out of memory|hipErrorOutOfMemory"
            r"|CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED|HIPBLAS_STATUS_ALLOC_FAILED"
            r"|oom[-_]kill|Out Of Memory|MemoryError|Cannot allocate memory",
            re.IGNORECASE,
        ),
    ),
    (
        NAN,
        re.compile(
            r"non-finite loss|loss is (?:nan|inf)|exited with exit code "
            + str(_EXIT_BAD_STEPS)
            + r"\b",
            re.IGNORECASE,
        ),
    ),
    (
        HANG,
        re.compile(
            r"no training step completed within|Watchdog caught collective operation timeout"
            r"|collective operation timeout|Timed out waiting \d+ms"
            r"|ProcessGroup\w*.*[Tt]imeout|NCCL.*timed? ?out|RCCL.*timed? ?out"
            r"|Socket Timeout|exited with exit code " + str(_EXIT_HANG) + r"\b",
            re.IGNORECASE,
        ),
    ),
    (
        NODE_FAILURE,
        re.compile(r"DUE TO NODE FAILURE|Node failure on|NODE_FAIL", re.IGNORECASE),
    ),
    (
        TIME_LIMIT,
        # Slurm's words, and the trainer's when it stopped at the time-limit warning signal
        re.compile(r"DUE TO TIME LIMIT|requeue signal received", re.IGNORECASE),
    ),
)
_ERROR_LINE = re.compile(
    r"error|exception|traceback|failed|fatal|killed|abort|refused", re.IGNORECASE
)
# lines that look like errors but are noise in every log
_NOISE = re.compile(r"FutureWarning|UserWarning|DeprecationWarning|\[WARNING\]")
_SLURM_STATES = {
    "TIMEOUT": TIME_LIMIT,
    "DEADLINE": TIME_LIMIT,
    "NODE_FAIL": NODE_FAILURE,
    "BOOT_FAIL": NODE_FAILURE,
    "OUT_OF_MEMORY": OOM,
    "PREEMPTED": CANCELLED,
    "CANCELLED": CANCELLED,
}


@dataclass(frozen=True)
class Outcome:
    """A point's failure class and the evidence for it (a log line, or the job state)."""

    cls: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.cls == OK


def last_error_line(log: str) -> str:
    """The last line of `log` that reads like an error (else its last non-empty line)."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for line in reversed(lines):
        if _ERROR_LINE.search(line) and not _NOISE.search(line):
            return _shorten(line)
    return _shorten(lines[-1]) if lines else ""


def _shorten(line: str, limit: int = 200) -> str:
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _match(log: str) -> Outcome | None:
    lines = log.splitlines()
    for cls, pattern in _PATTERNS:
        # the first such line is the cause; later ones are other ranks echoing it
        hit = next((ln.strip() for ln in lines if pattern.search(ln)), None)
        if hit is not None:
            return Outcome(cls, _shorten(hit))
    return None


def classify(state: str, log: str = "", *, has_metrics: bool = True) -> Outcome:
    """The class of a finished job from its Slurm (or local) state and its log text.

    The scheduler's verdict wins where it is unambiguous (time limit, node failure); a
    cancelled or failed job is then explained by its log, because Slurm reports a rank
    killed after a CUDA OOM as plain FAILED and a job stopped at its time limit after a
    hang as TIMEOUT only when the watchdog was off.
    """
    state = (state or "UNKNOWN").split()[0].upper()
    if state in ("TIMEOUT", "DEADLINE", "NODE_FAIL", "BOOT_FAIL"):
        found = _match(log)
        if state in ("TIMEOUT", "DEADLINE") and found and found.cls == HANG:
            return found  # it timed out because it hung: say so
        return Outcome(_SLURM_STATES[state], f"Slurm state {state}")
    if state == "COMPLETED":
        if not has_metrics:
            return Outcome(OTHER, "completed without writing metrics.jsonl")
        return Outcome(OK)
    found = _match(log)
    if found is not None:
        return found
    if state in _SLURM_STATES:
        return Outcome(_SLURM_STATES[state], last_error_line(log) or f"Slurm state {state}")
    return Outcome(OTHER, last_error_line(log) or f"Slurm state {state}")


def stalled(idle_s: float, deadline_s: float) -> Outcome | None:
    """A running point whose metrics (or log) have not moved within the deadline: a hang."""
    if deadline_s > 0 and idle_s > deadline_s:
        return Outcome(
            HANG, f"no progress for {idle_s:.0f} s (deadline {deadline_s:g} s); still running"
        )
    return None
