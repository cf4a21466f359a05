"""The trainer end to end with PFT and EP = 2 on two real ranks (torchrun, gloo): it learns."""

from __future__ import annotations

from helpers import read_metrics, run_xmoe


def test_pft_ep2_training_loss_falls(tmp_path):
    args = [
        "train",
        "--config",
        "tiny",
        "--run-dir",
        str(tmp_path),
        "--set",
        "moe.dispatcher=pft",
        "--set",
        "parallel.ep=2",
        "--set",
        "moe.capacity_factor=1.25",  # dropping: capacity ranks exchanged rows too
        "--set",
        "train.global_batch=16",
        "--set",
        "train.steps=16",
        "--set",
        "train.log_interval=1",
    ]
    proc = run_xmoe(args, nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == list(range(1, 17))
    first = sum(r["lm_loss"] for r in recs[:3]) / 3
    last = sum(r["lm_loss"] for r in recs[-3:]) / 3
    assert last < first - 1.0, (first, last)
    assert all(0 <= r["dropped_fraction"] < 0.5 for r in recs)
