"""The plan inside `render`/`submit`: applied unless fixed, recorded, kept on resume."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from xmoe.config import load_config
from xmoectl import planner, render, runs
from xmoectl import sites as S

FIT = ["train.global_batch=64"]


def test_gpu_site_gets_the_planned_layout_and_plan_json(tmp_path):
    site = S.load("frontier")
    job = render.resolve(site, "small", 2, tmp_path / "r", overrides=FIT)
    assert job.plan is not None
    chosen = job.plan["chosen"]["layout"]
    got = planner.config_layout(job.config)
    assert (got.ep, got.micro_batch, got.dispatcher) == (
        chosen["ep"], chosen["micro_batch"], chosen["dispatcher"],
    )  # fmt: skip
    # the same plan as `xmoectl plan` makes (TP held at 1 until the trainer has SSMB)
    limits = {} if planner.trainer_has_tp() else {"tp": 1}
    direct = planner.make_plan(load_config("small", FIT), site, 2, overrides=FIT, limits=limits)
    assert direct.chosen.layout == got
    runs.write_run(job, render.render_script(job), ["test"])
    saved = json.loads((tmp_path / "r" / "plan.json").read_text())
    assert saved["overrides"] == direct.overrides() and saved["world_size"] == 16
    assert load_config(str(tmp_path / "r" / "config.yaml")).parallel.ep == got.ep


def test_fixed_fields_win_and_the_rest_is_planned(tmp_path):
    sets = [*FIT, "parallel.ep=4", "parallel.zero_stage=2"]
    job = render.resolve(S.load("frontier"), "small", 2, tmp_path / "r", overrides=sets)
    assert job.config.parallel.ep == 4 and job.config.parallel.zero_stage == 2
    assert job.plan["fixed"] == {"ep": 4, "zero_stage": 2}
    assert job.plan["chosen"]["layout"]["ep"] == 4


def test_resume_keeps_the_recorded_layout(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    recorded = {"overrides": ["parallel.ep=2", "train.micro_batch=2"], "chosen": None}
    (run_dir / "plan.json").write_text(json.dumps(recorded))
    job = render.resolve(S.load("frontier"), "small", 2, run_dir, overrides=FIT, resume=True)
    assert job.config.parallel.ep == 2 and job.config.train.micro_batch == 2
    assert job.plan == recorded


def test_cpu_sites_are_not_planned(tmp_path):
    job = render.resolve(
        S.load("local-slurm"), "tiny", 2, tmp_path / "r", overrides=["train.global_batch=32"]
    )
    assert job.plan is None and job.config.parallel.ep == 1
    runs.write_run(job, render.render_script(job), ["test"])
    assert not (tmp_path / "r" / "plan.json").exists()


def test_no_fit_refuses_submission_unless_every_field_is_fixed(tmp_path):
    site = S.load("frontier")
    with pytest.raises(planner.PlanError, match=r"smallest node count that fits is \d+"):
        render.resolve(site, "large", 4, tmp_path / "a")
    every = [
        "parallel.tp=2", "parallel.ep=32", "parallel.ssmb=true", "parallel.zero_stage=1",
        "moe.dispatcher=pft", "moe.capacity_factor=1.25", "train.micro_batch=1",
        "train.activation_checkpointing=false",
    ]  # fmt: skip
    job = render.resolve(site, "large", 4, tmp_path / "b", overrides=every)
    assert job.plan["chosen"] is None and job.plan["feasible"] == 0
    assert job.config.parallel.ep == 32


def test_submit_dry_run_cli_refuses_in_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "xmoectl.cli", "render", "--site", "frontier", "--model", "large",
         "--nodes", "4", "--dry-run"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "fix every layout field with --set" in r.stderr


def test_thin_nodes_without_network_figures_are_not_planned(tmp_path):
    site = S.load("h200")
    assert site.node.nics == 0
    job = render.resolve(
        site, "tiny", 2, tmp_path / "r", overrides=["train.global_batch=8", "train.micro_batch=1"]
    )
    assert job.plan is None
    one = render.resolve(
        replace(site),
        "tiny",
        1,
        tmp_path / "s",
        overrides=["train.global_batch=8", "train.micro_batch=1"],
    )
    assert one.plan is not None and one.plan["world_size"] == 4
