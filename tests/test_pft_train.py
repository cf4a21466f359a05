"""The trainer end to end with PFT and EP = 2 on two real ranks (torchrun, gloo): it learns."""

from __future__ import annotations

from helpers import read_metrics, run_xmoe


def _train(run_dir, extra=()):
    args = [
        "train",
        "--config",
        "tiny",
        "--run-dir",
        str(run_dir),
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
        *(a for o in extra for a in ("--set", o)),
    ]
    proc = run_xmoe(args, nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return read_metrics(run_dir)


def test_pft_ep2_training_loss_falls(tmp_path):
    recs = _train(tmp_path / "plain")
    assert [r["step"] for r in recs] == list(range(1, 17))
    first = sum(r["lm_loss"] for r in recs[:3]) / 3
    last = sum(r["lm_loss"] for r in recs[-3:]) / 3
    assert last < first - 1.0, (first, last)
    assert all(0 <= r["dropped_fraction"] < 0.5 for r in recs)

    # moe.overlap_ep runs the same arithmetic in another order (the own and the exchanged
    # rows' expert gradients are summed in its node): the same run, to rounding; also when
    # activation checkpointing recomputes the layers (and their exchanges) in backward.
    # moe.dedup_ep sums each token's outputs per rank before the rows go back: likewise,
    # with its fixed pilot slots too (the exchanges queued before the host sync).
    for extra in (
        ["moe.overlap_ep=true"],
        ["moe.overlap_ep=true", "train.activation_checkpointing=true"],
        ["moe.dedup_ep=true"],
        ["moe.dedup_ep=true", "moe.overlap_ep=true", "train.activation_checkpointing=true"],
        ["moe.dedup_ep=true", "moe.dedup_fixed_slots=true", "train.activation_checkpointing=true"],
    ):
        over = _train(tmp_path / "-".join(extra), extra)
        for a, b in zip(recs, over, strict=True):
            assert abs(a["lm_loss"] - b["lm_loss"]) < 1e-3 * a["lm_loss"], (extra, a, b)
