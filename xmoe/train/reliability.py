"""Keeping a long run alive and honest: requeue on the time-limit signal, bad steps, hangs.

What each piece is for:
- `install_requeue_signal` / `StepGuard.stop_requested`: Slurm sends the job's warning
  signal (`--signal=USR1@<grace>`) some time before the allocation ends. The handler only
  sets a flag; at the next step boundary all ranks agree (one tiny all-reduce, so it is
  enough that any rank got the signal), the loop writes a checkpoint, leaves the `requeue`
  marker in the run directory and exits with `EXIT_REQUEUE`; the job script then requeues
  the job, which resumes from that checkpoint.
- `StepGuard`: a step whose loss is NaN/inf on any rank is skipped on every rank (the
  optimizer sees no gradients, so neither weights nor Adam moments move); after
  `max_bad_steps` such steps in a row the run stops with `EXIT_BAD_STEPS`, and the
  checkpoints on disk all hold weights from before the fault.
- `Watchdog`: a thread that ends the process (`EXIT_HANG`, a message naming the rank and
  the last completed step, every thread's stack) when no step completes within the
  deadline, so a stuck collective fails the job fast instead of burning the allocation.
- `FaultPlan`: faults injected into real runs for tests, from `XMOE_FAULT`, e.g.
  `XMOE_FAULT=nan@step:12,hang@rank1:step:5`. Kinds: `nan`/`inf` (this step's loss),
  `hang` (sleep forever before the step), `kill` (SIGKILL itself before the step),
  `signal` (send itself the requeue signal before the step). Without `rankR:` a fault
  applies to every rank.
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from xmoe.config import ConfigError

EXIT_REQUEUE = 75  # checkpoint written at the warning signal: run the job again
EXIT_BAD_STEPS = 76  # too many non-finite steps in a row
EXIT_HANG = 77  # the watchdog saw no progress within train.hang_timeout_s
REQUEUE_MARKER = "requeue"  # file in the run directory: the job script requeues when present
FAULT_ENV = "XMOE_FAULT"
SIGNAL_ENV = "XMOE_REQUEUE_SIGNAL"  # the signal the job asks Slurm for (default USR1)
FAULT_KINDS = ("nan", "inf", "hang", "kill", "signal")


class StopTraining(SystemExit):
    """Ends the trainer process with a distinctive exit code after a clear message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code)
        self.message = message


# --------------------------------------------------------------------------- signals

_stop_signal = {"received": None}


def requeue_signal() -> signal.Signals:
    """The warning signal this job was given: `$XMOE_REQUEUE_SIGNAL` (USR1 when unset)."""
    name = os.environ.get(SIGNAL_ENV, "USR1").upper()
    name = name if name.startswith("SIG") else "SIG" + name
    sig = getattr(signal, name, None)
    if not isinstance(sig, signal.Signals):
        raise ConfigError(f"{SIGNAL_ENV}={name!r} is not a signal name: use e.g. USR1 or USR2")
    return sig


def install_requeue_signal() -> signal.Signals:
    """Turn the warning signal into a flag read at the next step boundary.

    Install it before data workers are forked: they inherit the handler and so survive the
    signal Slurm sends to every process of the job step.
    """
    sig = requeue_signal()
    _stop_signal["received"] = None

    def _handler(signum: int, frame: Any) -> None:
        _stop_signal["received"] = signum

    if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
        signal.signal(sig, _handler)
    return sig


def signal_received() -> bool:
    return _stop_signal["received"] is not None


def write_requeue_marker(run_dir: Path, step: int) -> None:
    """Tell the job script that a checkpoint was written and the run wants another allocation."""
    tmp = Path(run_dir) / f".{REQUEUE_MARKER}.tmp"
    tmp.write_text(json.dumps({"step": step, "time": time.time()}) + "\n")
    os.replace(tmp, Path(run_dir) / REQUEUE_MARKER)


def clear_requeue_marker(run_dir: Path) -> None:
    (Path(run_dir) / REQUEUE_MARKER).unlink(missing_ok=True)


def trim_metrics(run_dir: Path, step: int) -> int:
    """Move metric records past `step` (work lost with the last process) out of the way.

    They go to `metrics.discarded.jsonl`, so `metrics.jsonl` reads as one run with each step
    once while nothing written is lost. Returns how many were moved.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep, drop = [], []
    for ln in lines:
        (keep if json.loads(ln).get("step", 0) <= step else drop).append(ln)
    if drop:
        with open(Path(run_dir) / "metrics.discarded.jsonl", "a") as f:
            f.writelines(ln + "\n" for ln in drop)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, path)
    return len(drop)


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None  # None: every rank


class FaultPlan:
    """Faults to inject, parsed from `XMOE_FAULT` (empty when unset)."""

    _ITEM = re.compile(r"(?P<kind>[a-z]+)@(?:rank(?P<rank>\d+):)?step:(?P<step>\d+)\Z")

    def __init__(self, spec: str, rank: int) -> None:
        self.rank = rank
        self.faults: list[Fault] = []
        for item in filter(None, (s.strip() for s in spec.split(","))):
            m = self._ITEM.match(item)
            if not m or m["kind"] not in FAULT_KINDS:
                raise ConfigError(
                    f"{FAULT_ENV} item {item!r} must look like KIND@[rankR:]step:N "
                    f"with KIND one of {', '.join(FAULT_KINDS)}"
                )
            rank_ = None if m["rank"] is None else int(m["rank"])
            self.faults.append(Fault(m["kind"], int(m["step"]), rank_))

    @classmethod
    def from_env(cls, rank: int) -> FaultPlan:
        return cls(os.environ.get(FAULT_ENV, ""), rank)

    def due(self, kind: str, step: int) -> bool:
        return any(
            f.kind == kind and f.step == step and f.rank in (None, self.rank) for f in self.faults
        )

    def before_step(self, step: int) -> None:
        """Faults that strike as step `step` begins on this rank."""
        if self.due("signal", step):
            os.kill(os.getpid(), requeue_signal())
        if self.due("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.due("hang", step):
            print(f"xmoe: fault injected: rank {self.rank} hangs at step {step}", flush=True)
            while True:
                time.sleep(3600)

    def poison(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        for kind, value in (("nan", float("nan")), ("inf", float("inf"))):
            if self.due(kind, step):
                return loss * value
        return loss


# --------------------------------------------------------------------------- bad steps


def _torch_optimizer(engine: Any) -> torch.optim.Optimizer:
    opt = getattr(engine, "basic_optimizer", None) or engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"no torch optimizer inside {type(engine.optimizer).__name__}")
    return opt


class StepGuard:
    """Per-step agreement of all ranks on 'skip this update' and 'stop for requeue'.

    The training step calls `poison` on each micro-batch loss (fault injection) and
    `before_update` once before the update; the loop reads `skipped` and `stop_requested`.
    """

    def __init__(self, engine: Any, rank: int, max_bad_steps: int) -> None:
        self.engine = engine
        self.max_bad_steps = max_bad_steps
        self.faults = FaultPlan.from_env(rank)
        self.step = 0  # the step being computed (1-based)
        self.skipped = False
        self.stop_requested = False
        self.bad_in_a_row = 0
        self.skipped_total = 0
        self._drop_grads = False
        self._ds_skipped = getattr(engine, "skipped_steps", 0)
        self._hook = _torch_optimizer(engine).register_step_pre_hook(self._pre_step)

    def close(self) -> None:
        """Unhook from the optimizer (which otherwise keeps this guard and its engine)."""
        self._hook.remove()

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # an optimizer without gradients changes nothing: no weight, moment or step count moves
        if self._drop_grads:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def before_step(self, step: int) -> None:
        self.step = step
        self.skipped = False
        self.faults.before_step(step)

    def poison(self, loss: torch.Tensor) -> torch.Tensor:
        return self.faults.poison(loss, self.step)

    def before_update(self, losses_finite: bool) -> bool:
        """Agree with every rank on this step; returns True when the update is skipped."""
        flags = torch.tensor([0.0 if losses_finite else 1.0, float(signal_received())])
        if dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device(self.engine.device)
            flags_dev = flags.to(device)
            dist.all_reduce(flags_dev, op=dist.ReduceOp.MAX)
            flags = flags_dev.cpu()
        self.skipped = bool(flags[0] > 0)
        self.stop_requested = self.stop_requested or bool(flags[1] > 0)
        self._drop_grads = self.skipped
        return self.skipped

    def after_update(self) -> None:
        """Bookkeeping once the step is done; raises StopTraining after too many bad steps."""
        self._drop_grads = False
        ds_skipped = getattr(self.engine, "skipped_steps", 0)
        if ds_skipped != self._ds_skipped:
            # DeepSpeed's own overflow check skipped the update and held the LR schedule
            # back; keep the schedule tied to the step number as on every other path
            self._ds_skipped = ds_skipped
            self.skipped = True  # its check agrees across ranks: count it like ours
            if self.engine.lr_scheduler is not None:
                self.engine.lr_scheduler.step()
        if not self.skipped:
            self.bad_in_a_row = 0
            return
        self.bad_in_a_row += 1
        self.skipped_total += 1
        if self.bad_in_a_row >= self.max_bad_steps:
            raise StopTraining(
                EXIT_BAD_STEPS,
                f"stopping: {self.bad_in_a_row} steps in a row (up to step {self.step}) had a "
                f"non-finite loss (train.max_bad_steps={self.max_bad_steps}); no update was "
                "applied, so the checkpoints on disk hold weights from before the fault. "
                "Lower train.lr or raise train.grad_clip, then resume.",
            )


# --------------------------------------------------------------------------- hangs


class Watchdog:
    """Aborts this process when no step completes within `timeout_s` (0 = off)."""

    def __init__(self, timeout_s: float, rank: int, poll_s: float | None = None) -> None:
        self.timeout_s = float(timeout_s)
        self.rank = rank
        self.last_step = 0
        self._last_beat = time.monotonic()
        self._stop = threading.Event()
        self._poll_s = poll_s or max(0.05, min(5.0, self.timeout_s / 20))
        self._thread: threading.Thread | None = None

    def start(self, step: int = 0) -> Watchdog:
        self.beat(step)
        if self.timeout_s > 0:
            self._thread = threading.Thread(target=self._run, name="xmoe-watchdog", daemon=True)
            self._thread.start()
        return self

    def beat(self, step: int | None = None) -> None:
        if step is not None:
            self.last_step = step
        self._last_beat = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            idle = time.monotonic() - self._last_beat
            if idle > self.timeout_s:
                sys.stderr.write(
                    f"xmoe: rank {self.rank}: no training step completed within "
                    f"{self.timeout_s:g} s (last completed step {self.last_step}); aborting "
                    "(train.hang_timeout_s). Stacks of every thread follow.\n"
                )
                sys.stderr.flush()
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(EXIT_HANG)
