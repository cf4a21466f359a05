"""Reliability pieces on their own: fault specs, signals, the watchdog, checkpoint integrity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from xmoe.config import ConfigError
from xmoe.train import checkpoint as ckpt
from xmoe.train import reliability as rel

ONE_RANK = SimpleNamespace(rank=0, world=1, tp=1, ep=1, dp=1)


def test_fault_spec_parses_ranks_and_steps():
    plan = rel.FaultPlan("nan@step:12, hang@rank1:step:5,signal@rank0:step:3", rank=1)
    assert plan.due("nan", 12) and not plan.due("nan", 11)
    assert plan.due("hang", 5)
    assert not plan.due("signal", 3)  # rank 0 only
    assert not rel.FaultPlan("hang@rank1:step:5", rank=0).due("hang", 5)
    loss = torch.tensor(2.0)
    assert torch.isnan(plan.poison(loss, 12)) and plan.poison(loss, 13) == 2.0
    assert torch.isinf(rel.FaultPlan("inf@step:2", 0).poison(loss, 2))
    assert rel.FaultPlan("", 0).faults == []


@pytest.mark.parametrize("spec", ["nan", "nan@12", "boom@step:3", "hang@rank:step:1", "nan@step:x"])
def test_bad_fault_spec_is_one_line_naming_the_variable(spec):
    with pytest.raises(ConfigError, match="XMOE_FAULT item") as e:
        rel.FaultPlan(spec, 0)
    assert "\n" not in str(e.value)


def test_requeue_signal_from_environment(monkeypatch):
    monkeypatch.delenv(rel.SIGNAL_ENV, raising=False)
    assert rel.requeue_signal() == signal.SIGUSR1
    monkeypatch.setenv(rel.SIGNAL_ENV, "usr2")
    assert rel.requeue_signal() == signal.SIGUSR2
    monkeypatch.setenv(rel.SIGNAL_ENV, "SIGNOPE")
    with pytest.raises(ConfigError, match="XMOE_REQUEUE_SIGNAL"):
        rel.requeue_signal()


def test_signal_sets_the_flag_instead_of_killing(monkeypatch):
    monkeypatch.setenv(rel.SIGNAL_ENV, "USR2")
    before = signal.getsignal(signal.SIGUSR2)
    try:
        rel.install_requeue_signal()
        assert not rel.signal_received()
        os.kill(os.getpid(), signal.SIGUSR2)
        for _ in range(100):  # delivered at the next bytecode boundary
            if rel.signal_received():
                break
            time.sleep(0.01)
        assert rel.signal_received()
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_trim_metrics_drops_records_past_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)))
    assert rel.trim_metrics(tmp_path, 4) == 3
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]
    discarded = (tmp_path / "metrics.discarded.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in discarded] == [5, 6, 7]  # kept aside, not lost
    assert rel.trim_metrics(tmp_path, 4) == 0
    assert rel.trim_metrics(tmp_path / "absent", 0) == 0


def test_requeue_marker_round_trip(tmp_path):
    rel.write_requeue_marker(tmp_path, 17)
    assert json.loads((tmp_path / rel.REQUEUE_MARKER).read_text())["step"] == 17
    rel.clear_requeue_marker(tmp_path)
    rel.clear_requeue_marker(tmp_path)  # absent is fine
    assert not (tmp_path / rel.REQUEUE_MARKER).exists()


_WATCHDOG = """
import sys, time
from xmoe.train.reliability import Watchdog
dog = Watchdog(float(sys.argv[1]), rank=3).start(5)
t_end = time.monotonic() + float(sys.argv[2])
step = 5
while time.monotonic() < t_end:  # steps that keep completing
    time.sleep(0.05)
    step += 1
    dog.beat(step)
print("stalling at", time.time(), "after step", step, flush=True)
time.sleep(60)  # no step completes any more
"""


def _watchdog(timeout: float, busy: float) -> tuple[subprocess.CompletedProcess, float]:
    """Run the script; returns the process and the seconds from its stall to its exit."""
    proc = subprocess.run(
        [sys.executable, "-c", _WATCHDOG, str(timeout), str(busy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    stalled_at = float(proc.stdout.split()[2]) if proc.stdout else float("nan")
    return proc, time.time() - stalled_at


def test_watchdog_aborts_naming_rank_and_last_step():
    proc, after_stall = _watchdog(timeout=1.0, busy=1.5)
    assert proc.returncode == rel.EXIT_HANG, proc.stderr
    last = int(proc.stdout.split()[-1])
    assert last > 20  # it did not fire while steps completed every 0.05 s
    assert f"rank 3: no training step completed within 1 s (last completed step {last})" in (
        proc.stderr
    )
    assert "xmoe-watchdog" in proc.stderr or "Thread" in proc.stderr  # stacks were dumped
    assert 1.0 <= after_stall < 1.0 + 3.0  # the deadline, then promptly


# --------------------------------------------------------------------------- checkpoints


def _fake_tag(ckpt_dir: Path, step: int, payload: bytes = b"weights") -> Path:
    """A tag directory with files and a manifest, as save_checkpoint leaves it."""
    tag_dir = ckpt_dir / ckpt.tag_for(step)
    (tag_dir / "sub").mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(payload * 100)
    (tag_dir / "rank0.pt").write_bytes(b"rank state %d" % step)
    (tag_dir / "sub" / "extra.bin").write_bytes(b"\x00" * 33)
    files = ckpt._checksum_share(tag_dir, ONE_RANK)
    manifest = {"step": step, "tag": tag_dir.name, "world": 1, "tp": 1, "ep": 1, "dp": 1}
    (tag_dir / ckpt.MANIFEST).write_text(json.dumps({**manifest, "files": files}))
    return tag_dir


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "flipped byte": (
        lambda d: _flip_byte(d / "mp_rank_00_model_states.pt"),
        "mp_rank_00_model_states.pt does not match its sha256",
    ),
    "truncated file": (
        lambda d: (d / "rank0.pt").write_bytes(b"rank"),
        "rank0.pt has 4 bytes, the manifest says 13",
    ),
    "missing file": (lambda d: (d / "sub" / "extra.bin").unlink(), "sub/extra.bin is missing"),
    "no manifest (save interrupted)": (
        lambda d: (d / ckpt.MANIFEST).unlink(),
        "no manifest.json: the save did not finish",
    ),
    "garbage manifest": (
        lambda d: (d / ckpt.MANIFEST).write_text("{not json"),
        "unreadable manifest.json",
    ),
    "manifest of another tag": (
        lambda d: (d / ckpt.MANIFEST).write_text(
            (d / ckpt.MANIFEST).read_text().replace("step0000020", "step0000010")
        ),
        "manifest.json names tag 'step0000010'",
    ),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_or_partial_checkpoint_falls_back_to_the_previous(tmp_path, capsys, kind):
    damage, reason = CORRUPTIONS[kind]
    _fake_tag(tmp_path, 10)
    newest = _fake_tag(tmp_path, 20)
    assert ckpt.find_valid_checkpoint(tmp_path, ONE_RANK) == "step0000020"
    damage(newest)
    assert ckpt.find_valid_checkpoint(tmp_path, ONE_RANK) == "step0000010"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and reason in err[0] and "step0000020 is unusable" in err[0], err


def test_no_usable_checkpoint_is_a_clear_error(tmp_path, capsys):
    for step in (10, 20):
        _flip_byte(_fake_tag(tmp_path, step) / "rank0.pt")
    assert ckpt.find_valid_checkpoint(tmp_path, ONE_RANK) is None
    assert len(capsys.readouterr().err.strip().splitlines()) == 2
    with pytest.raises(ConfigError, match="no usable checkpoint"):
        ckpt.resume_latest(engine=None, ckpt_dir=tmp_path, pstate=ONE_RANK)


def test_staging_and_other_folders_are_not_checkpoints(tmp_path):
    assert ckpt.resume_latest(engine=None, ckpt_dir=tmp_path / "none", pstate=ONE_RANK) is None
    (tmp_path / ckpt.STAGING / "step0000030").mkdir(parents=True)  # a save cut short
    (tmp_path / "notes").mkdir()
    _fake_tag(tmp_path, 10)
    assert ckpt.list_tags(tmp_path) == ["step0000010"]
    assert ckpt.find_valid_checkpoint(tmp_path, ONE_RANK) == "step0000010"


def test_resume_with_another_layout_is_refused(tmp_path):
    tag_dir = _fake_tag(tmp_path, 10)
    ckpt._check_layout(tag_dir, ONE_RANK)
    two = SimpleNamespace(rank=0, world=2, tp=1, ep=1, dp=2)
    with pytest.raises(ConfigError, match="same ranks and parallel layout"):
        ckpt._check_layout(tag_dir, two)


def test_a_run_directory_is_never_overwritten_without_force(tmp_path, monkeypatch):
    from xmoe.cli import check_run_dir

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    _fake_tag(tmp_path / "checkpoints", 10)  # a run that died before its first metrics line
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoints\).*--resume"):
        check_run_dir(tmp_path, resume=False, force=False)
    check_run_dir(tmp_path, resume=True, force=False)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    check_run_dir(tmp_path, resume=False, force=True)
    (aside,) = tmp_path.glob("replaced-*")
    assert (aside / "metrics.jsonl").read_text() == '{"step": 1}\n'  # moved, not deleted
    assert ckpt.find_valid_checkpoint(aside / "checkpoints", ONE_RANK) == "step0000010"
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    check_run_dir(tmp_path, resume=False, force=False)  # now empty: a new run may start


# --------------------------------------------------------------------------- job scripts


def _render(site: str, tmp_path: Path, **kw) -> str:
    from xmoectl import render
    from xmoectl import sites as S

    fit = ["train.micro_batch=1", "train.global_batch=16"]
    job = render.resolve(S.load(site), "tiny", 2, tmp_path / site, overrides=fit, **kw)
    return render.render_script(job)


@pytest.mark.parametrize("site, grace", [("frontier", 300), ("perlmutter", 300), ("h200", 180)])
def test_every_slurm_job_asks_for_the_warning_and_may_requeue(site, grace, tmp_path):
    text = _render(site, tmp_path)
    for line in (
        f"#SBATCH --signal=USR2@{grace}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
    ):
        assert line in text
    assert "export XMOE_REQUEUE_SIGNAL=USR2" in text
    assert '[ "${SLURM_RESTART_COUNT:-0}" -lt 10 ]' in text  # slurm.max_restarts


def test_torchrun_jobs_hand_the_warning_to_their_ranks(tmp_path):
    text = _render("dgx-a100", tmp_path)
    assert (
        'export PET_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIG${XMOE_REQUEUE_SIGNAL}"'
        in text
    )
    assert "export PET_SHUTDOWN_TIMEOUT=240" in text


def test_requeue_settings_are_checked(tmp_path):
    from xmoectl import UserError
    from xmoectl import sites as S

    with pytest.raises(UserError, match="not longer than the requeue warning"):
        _render("local-slurm", tmp_path, time="1")  # 60 s, the local warning is 60 s
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nslurm: {max_restarts: -1}\n")
    with pytest.raises(S.SiteError, match="field slurm.max_restarts must be a whole number >= 0"):
        S.load(str(bad))
