"""The training loop end to end, as real processes: learning, exact resume, data parallel."""

from __future__ import annotations

import math

import pytest
from helpers import read_metrics, run_xmoe

# expert bias and capacity dropping on: resume must restore every piece of state they use
COMMON = ["--set", "moe.expert_bias=true", "--set", "moe.capacity_factor=1.25"]
# the uninterrupted run and its interrupted twin: 30 steps, logged every step, saved every 10
RUN30 = ["train", "--config", "tiny", *COMMON, "--set", "train.steps=30"]
RUN30 += ["--set", "train.log_interval=1", "--set", "train.save_interval=10"]


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """30 uninterrupted steps of the tiny preset, logged every step, saved every 10."""
    run_dir = tmp_path_factory.mktemp("full")
    _ok(run_xmoe([*RUN30, "--run-dir", str(run_dir)]))
    return run_dir


def test_tiny_loss_falls(full_run):
    recs = read_metrics(full_run)
    assert [r["step"] for r in recs] == list(range(1, 31))
    first = sum(r["lm_loss"] for r in recs[:3]) / 3
    last = sum(r["lm_loss"] for r in recs[-3:]) / 3
    assert first > 5.0 and last < first - 1.5, (first, last)
    for r in recs:
        for key in (
            "loss",
            "lm_loss",
            "aux_loss",
            "z_loss",
            "lr",
            "grad_norm",
            "tokens_per_s",
            "tflops_per_gpu",
            "peak_mem_gib",
            "dropped_fraction",
        ):
            assert math.isfinite(r[key]), key
        assert r["mfu"] is None  # CPU: no peak known
        assert len(r["expert_load_max_mean"]) == 3 and min(r["expert_load_max_mean"]) >= 1.0
        assert r["tokens_per_s"] > 0 and r["tflops_per_gpu"] > 0
    # warmup then cosine decay
    assert recs[0]["lr"] < recs[4]["lr"] and recs[-1]["lr"] < recs[10]["lr"]
    # keep_last=2: the step-10 checkpoint was pruned
    tags = sorted(p.name for p in (full_run / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["step0000020", "step0000030"]


def test_resume_is_bit_exact(full_run, tmp_path):
    args = [*RUN30, "--run-dir", str(tmp_path)]
    _ok(run_xmoe([*args, "--stop-after", "10"]))
    again = run_xmoe(args)  # without --resume the run directory is refused
    assert again.returncode == 2 and "--resume" in again.stderr
    out = _ok(run_xmoe([*args, "--resume", "--stop-after", "20"]))
    assert "resumed from" in out.stdout
    resumed = {r["step"]: r for r in read_metrics(tmp_path)}
    full = {r["step"]: r for r in read_metrics(full_run)}
    assert sorted(resumed) == list(range(1, 21))
    for step in range(11, 21):
        for key in (
            "loss",
            "lm_loss",
            "aux_loss",
            "z_loss",
            "grad_norm",
            "lr",
            "dropped_fraction",
            "expert_load_max_mean",
        ):
            assert resumed[step][key] == full[step][key], (step, key)


# dropless and no bias: fewer discrete decisions for fp32 rounding to flip
DP_ARGS = [
    "train",
    "--config",
    "tiny",
    "--set",
    "train.steps=4",
    "--set",
    "train.log_interval=1",
    "--set",
    "train.global_batch=16",
]


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory):
    """The reference: 1 rank, 2 accumulation micro-batches of 8."""
    run_dir = tmp_path_factory.mktemp("one")
    _ok(run_xmoe([*DP_ARGS, "--run-dir", str(run_dir)]))
    return read_metrics(run_dir)


@pytest.mark.parametrize(
    "layout",
    [
        ["--set", "parallel.zero_stage=1"],
        # EP=2: expert grads reduce over expert-DP only, the norm spans both ranks' experts
        ["--set", "parallel.zero_stage=2", "--set", "parallel.ep=2", "--set", "moe.dispatcher=pft"],
        ["--set", "parallel.zero_stage=0", "--set", "parallel.ep=2", "--set", "moe.dispatcher=pft"],
    ],
    ids=["dp2-zero1", "ep2-zero2", "ep2-zero0"],
)
def test_two_ranks_match_one_rank(one_rank_run, tmp_path, layout):
    # 2 ranks, 1 accumulation step each: the same 16 samples per step; a peak turns on MFU
    _ok(run_xmoe([*DP_ARGS, *layout, "--run-dir", str(tmp_path), "--peak-tflops", "0.5"], nproc=2))
    a, b = one_rank_run, read_metrics(tmp_path)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        # Same samples, same init: only the order of fp32 gradient sums differs, which can
        # flip a near-tie top-k choice after the first update; different data or gradient
        # scaling would move these by 1e-2 or more.
        rel = 1e-6 if x["step"] == 1 else 1e-4
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr"):
            assert y[key] == pytest.approx(x[key], rel=rel, abs=1e-7), (x["step"], key)
        assert y["tokens_per_s"] > 0
        assert y["mfu"] == pytest.approx(y["tflops_per_gpu"] / 0.5)


def test_expert_parallel_resume_is_bit_exact(tmp_path):
    """EP=2 on 2 ranks: each rank's own experts and optimizer shards come back exactly."""
    args = [
        "train",
        "--config",
        "tiny",
        *COMMON,
        "--set",
        "moe.dispatcher=pft",
        "--set",
        "parallel.ep=2",
        "--set",
        "train.global_batch=16",
        "--set",
        "train.steps=6",
        "--set",
        "train.log_interval=1",
        "--set",
        "train.save_interval=3",
    ]
    full, cut = tmp_path / "full", tmp_path / "cut"
    _ok(run_xmoe([*args, "--run-dir", str(full)], nproc=2))
    _ok(run_xmoe([*args, "--run-dir", str(cut), "--stop-after", "3"], nproc=2))
    tag = cut / "checkpoints" / "step0000003"
    assert (tag / "experts_ep0.pt").is_file() and (tag / "experts_ep1.pt").is_file()
    _ok(run_xmoe([*args, "--run-dir", str(cut), "--resume"], nproc=2))
    a, b = read_metrics(full), read_metrics(cut)
    assert [r["step"] for r in b] == list(range(1, 7))
    for x, y in zip(a[3:], b[3:]):
        for key in ("loss", "grad_norm", "aux_loss", "expert_load_max_mean"):
            assert x[key] == y[key], (x["step"], key)


def test_optimizer_groups_cover_every_parameter_once_and_none_empty():
    import torch

    from xmoe.config import load_config
    from xmoe.model import Transformer
    from xmoe.train.engine import param_groups

    model = Transformer(load_config("tiny"))
    # a limit below one expert tensor: DeepSpeed's splitter would add an empty group here
    groups = param_groups(model, 0.1, max_group_size=1000)
    assert all(g["params"] for g in groups)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    for g in groups:
        moe = [getattr(p, "allreduce", True) is False for p in g["params"]]
        assert all(moe) == bool(g.get("moe")) and (all(moe) or not any(moe))
        assert g["weight_decay"] == (0.0 if all(p.dim() == 1 for p in g["params"]) else 0.1)
    assert torch.is_tensor(groups[0]["params"][0])


def test_adamw_runs_fused_on_gpus_and_the_fused_update_equals_the_loop():
    """The GPU engine asks AdamW for its fused kernel; that kernel gives the loop's update
    (checked with torch's CPU fused AdamW, the same algorithm)."""
    import torch

    from xmoe.train.engine import adamw_kernel

    assert adamw_kernel(torch.device("cuda", 0)) == {"fused": True}
    assert adamw_kernel(torch.device("cpu")) == {"foreach": False}
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(7, 5, generator=g), torch.randn(11, generator=g)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    results = []
    for kind in ({"fused": True}, {"foreach": False}):
        ps = [p.clone().requires_grad_() for p in params]
        opt = torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, **kind)
        for step in grads:
            for p, gr in zip(ps, step):
                p.grad = gr.clone()
            opt.step()
        results.append([p.detach() for p in ps])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
