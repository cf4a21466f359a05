"""Faults in real two-rank CPU training runs (torchrun, gloo, DeepSpeed), injected via XMOE_FAULT.

SIGKILL mid-run, the requeue signal and a corrupted checkpoint all end in a resumed run whose
losses equal an uninterrupted run's bit for bit; a NaN loss on one rank is skipped on both;
a hung rank is aborted by the watchdog within its deadline.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, free_port, read_metrics

from xmoe.train import reliability as rel

STEPS = 8
ARGS = [
    "train", "--config", "tiny",
    "--set", f"train.steps={STEPS}",
    "--set", "train.micro_batch=4",  # global batch 8 over 2 ranks
    "--set", "train.log_interval=1",
    "--set", "train.save_interval=3",
    "--set", "train.keep_last=3",
    # expert bias and capacity dropping on: resume must restore the state they use
    "--set", "moe.expert_bias=true",
    "--set", "moe.capacity_factor=1.25",
]  # fmt: skip
EXACT = ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm", "lr", "expert_load_max_mean")


def _env(fault: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "XMOE_"))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env[rel.FAULT_ENV] = fault
    return env


def _cmd(args: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={free_port()}", "-m", "xmoe", *args,
    ]  # fmt: skip


def run2(args: list[str], fault: str = "", timeout: float = 240) -> subprocess.CompletedProcess:
    """Two gloo ranks under torchrun, with faults from `fault`; output as one text."""
    for _ in range(3):
        proc = subprocess.run(
            _cmd(args),
            cwd=REPO,
            env=_env(fault),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
        # the free port can be taken by another process before torchrun binds it
        if "address already in use" not in proc.stdout.lower():
            break
    return proc


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc


def _same_curve(run_dir: Path, reference: Path) -> None:
    got = {r["step"]: r for r in read_metrics(run_dir)}
    want = {r["step"]: r for r in read_metrics(reference)}
    assert sorted(got) == list(range(1, STEPS + 1))  # no step twice, none missing
    for step in range(1, STEPS + 1):
        for key in EXACT:
            assert got[step][key] == want[step][key], (step, key)


def _tags(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run: checkpoints at steps 3, 6 and 8."""
    run_dir = tmp_path_factory.mktemp("reference")
    _ok(run2([*ARGS, "--run-dir", str(run_dir)]))
    assert _tags(run_dir) == ["step0000003", "step0000006", "step0000008"]
    return run_dir


def test_sigkill_one_rank_then_resume_matches_uninterrupted(reference, tmp_path):
    killed = run2([*ARGS, "--run-dir", str(tmp_path)], fault="kill@rank1:step:5")
    assert killed.returncode != 0
    assert "Signal 9 (SIGKILL)" in killed.stdout or "SIGKILL" in killed.stdout, killed.stdout[
        -3000:
    ]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert _tags(tmp_path) == ["step0000003"]
    out = _ok(run2([*ARGS, "--run-dir", str(tmp_path), "--resume"])).stdout
    assert f"resumed from {tmp_path / 'checkpoints' / 'step0000003'} at step 3" in out
    _same_curve(tmp_path, reference)  # the records of step 4 were replaced, not duplicated


def test_requeue_signal_on_one_rank_checkpoints_all_and_resumes_exactly(reference, tmp_path):
    stopped = run2([*ARGS, "--run-dir", str(tmp_path)], fault="signal@rank0:step:4")
    out = stopped.stdout
    # both ranks left with the requeue code after the checkpoint of step 4
    assert (
        out.count(f"exitcode: {rel.EXIT_REQUEUE}") + out.count(f"exitcode  : {rel.EXIT_REQUEUE}")
        >= 1
    ), out[-3000:]
    assert "requeue signal received: checkpoint written at step 4" in out
    assert json.loads((tmp_path / rel.REQUEUE_MARKER).read_text())["step"] == 4
    assert _tags(tmp_path) == ["step0000003", "step0000004"]
    for rank in (0, 1):  # every rank wrote its part of the step-4 checkpoint
        assert (tmp_path / "checkpoints" / "step0000004" / f"rank{rank}.pt").is_file()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    out = _ok(run2([*ARGS, "--run-dir", str(tmp_path), "--resume"])).stdout
    assert "at step 4" in out
    assert not (tmp_path / rel.REQUEUE_MARKER).exists()
    _same_curve(tmp_path, reference)


def test_corrupted_checkpoint_falls_back_to_the_previous_one(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    newest = run_dir / "checkpoints" / "step0000008" / "rank1.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    out = _ok(run2([*ARGS, "--run-dir", str(run_dir), "--resume"])).stdout
    lines = [ln for ln in out.splitlines() if "is unusable" in ln]
    assert lines == [
        f"xmoe: checkpoint {run_dir / 'checkpoints' / 'step0000008'} is unusable "
        "(rank1.pt does not match its sha256); trying the one before it"
    ]
    assert f"resumed from {run_dir / 'checkpoints' / 'step0000006'} at step 6" in out
    _same_curve(run_dir, reference)  # steps 7 and 8 recomputed from step 6


def _tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj or [])
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        if isinstance(value, (dict, list, tuple, torch.Tensor)):
            out.update(_tensors(value, f"{prefix}/{key}"))
    return out


def _state(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Weights and optimizer moments/step counts of one checkpoint (not LR or counters)."""
    out = {}
    model = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)
    out.update(_tensors(model["module"], "module"))
    if isinstance(model.get("optimizer"), dict):
        out.update(_tensors(model["optimizer"].get("state"), "opt"))
    for f in sorted(tag_dir.glob("*optim_states.pt")):
        opt = torch.load(f, weights_only=False)["optimizer"]
        out.update(_tensors(opt.get("state") if isinstance(opt, dict) else opt, f.name))
    assert out
    return out


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_on_one_rank_is_skipped_everywhere_and_a_streak_stops_the_run(tmp_path):
    # ZeRO stage 0: DeepSpeed's own overflow check is off, so only our guard can skip
    args = [
        *ARGS, "--run-dir", str(tmp_path), "--set", "parallel.zero_stage=0",
        "--set", "train.save_interval=1", "--set", "train.keep_last=20",
        "--set", "train.max_bad_steps=3",
    ]  # fmt: skip
    proc = run2(args, fault="nan@rank1:step:3,nan@step:5,inf@rank0:step:6,nan@rank1:step:7")
    out = proc.stdout
    assert proc.returncode != 0
    assert f"exitcode  : {rel.EXIT_BAD_STEPS}" in out or f"exitcode: {rel.EXIT_BAD_STEPS}" in out
    assert "xmoe: stopping: 3 steps in a row (up to step 7) had a non-finite loss" in out
    recs = {r["step"]: r for r in read_metrics(tmp_path)}
    assert sorted(recs) == [1, 2, 3, 4, 5, 6]
    assert {s: r["skipped_steps"] for s, r in recs.items()} == {1: 0, 2: 0, 3: 1, 4: 0, 5: 1, 6: 1}
    assert math.isfinite(recs[4]["loss"]) and math.isnan(recs[3]["loss"])
    ck = tmp_path / "checkpoints"
    assert _tags(tmp_path) == [f"step{s:07d}" for s in range(1, 7)]  # none after the stop
    s2, s3, s4 = (_state(ck / f"step{s:07d}") for s in (2, 3, 4))
    assert _equal(s2, s3)  # the step whose loss was NaN on rank 1 moved nothing on any rank
    assert not _equal(s3, s4)  # the next step trained normally
    assert _equal(s4, _state(ck / "step0000006"))  # checkpoints of the streak hold good weights


def test_hung_rank_is_aborted_by_the_watchdog_within_the_deadline(tmp_path):
    deadline = 4.0
    args = [
        *ARGS, "--run-dir", str(tmp_path), "--set", f"train.hang_timeout_s={deadline}",
        "--set", "train.collective_timeout_s=300",  # so only the watchdog can end it early
    ]  # fmt: skip
    proc = subprocess.Popen(
        _cmd(args), cwd=REPO, env=_env("hang@rank1:step:3"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    hung_at: list[float] = []

    def read() -> None:
        for line in proc.stdout:
            if "hangs at step 3" in line:
                hung_at.append(time.monotonic())
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=240)
    finally:
        proc.kill()
    reader.join(timeout=10)
    ended = time.monotonic()
    out = "".join(lines)
    assert proc.returncode != 0 and hung_at, out[-3000:]
    # the step before the hang completed on both ranks; neither gets past it
    found = re.findall(
        r"rank (\d): no training step completed within 4 s \(last completed step (\d+)\)", out
    )
    assert found and {step for _, step in found} == {"2"}, out[-3000:]
    assert f"exitcode  : {rel.EXIT_HANG}" in out or f"exitcode: {rel.EXIT_HANG}" in out
    assert ended - hung_at[0] < deadline + 10, ended - hung_at[0]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
