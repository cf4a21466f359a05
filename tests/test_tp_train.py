"""Training with tensor parallelism end to end: `python -m xmoe train` on 2 gloo ranks, tp=2.

Both ranks form one TP group (DP = 1), so they read the same micro-batches as a one-rank
run; SSMB splits every micro-batch's tokens between them. Same data, same initial model,
same reduced gradients: the losses and gradient norms must track the one-rank run.
"""

from __future__ import annotations

import pytest
from helpers import read_metrics, run_xmoe

ARGS = "train --config tiny --set train.steps=4 --set train.log_interval=1".split()
ARGS += ["--set", "moe.dispatcher=pft"]


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.timeout(240)
def test_tp2_training_matches_one_rank(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _ok(run_xmoe([*ARGS, "--run-dir", str(one)]))
    _ok(
        run_xmoe(
            [*ARGS, "--run-dir", str(two), "--set", "parallel.tp=2", "--set", "parallel.ep=2"],
            nproc=2,
        )
    )
    a, b = read_metrics(one), read_metrics(two)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        for key in ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm", "lr"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["step"], key)
    assert b[-1]["lm_loss"] < b[0]["lm_loss"]
