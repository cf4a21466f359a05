"""Every impossible setting is refused through the CLI: one line naming the field, exit 2."""

import pytest
from click.testing import CliRunner
from helpers import run_xmoe

from xmoe.cli import main
from xmoe.config import (
    ConfigError,
    dedup_ep_active,
    dedup_fixed_active,
    load_config,
    validate,
)


@pytest.mark.parametrize(
    "override,words",
    [
        ("model.heads=5", ["model.hidden=128", "model.heads=5"]),
        ("moe.top_k=9", ["moe.top_k=9", "moe.num_experts=8"]),
        ("parallel.ep=3", ["parallel.ep=3", "moe.num_experts"]),
        ("parallel.ep=2", ["parallel.ep=2", "world size 1"]),
        ("train.global_batch=12", ["train.global_batch=12", "multiple of 8"]),
        ("moe.topk=2", ["unknown key moe.topk", "moe.top_k"]),
        ("train.steps=many", ["train.steps", "integer"]),
        ("moe.dispatcher=fast", ["moe.dispatcher='fast'", "reference"]),
        ("trian.steps=3", ["unknown key trian", "train"]),
    ],
)
def test_invalid_setting_exits_2_with_one_line(tmp_path, override, words):
    result = CliRunner().invoke(
        main, ["train", "--config", "tiny", "--set", override, "--run-dir", str(tmp_path / "r")]
    )
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_invalid_setting_as_a_real_process(tmp_path):
    proc = run_xmoe(
        ["train", "--set", "moe.top_k=0", "--run-dir", str(tmp_path / "r")], timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: moe.top_k=0 must be between 1 and moe.num_experts=8"
    ]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_unknown_preset_and_missing_file(tmp_path):
    r = CliRunner().invoke(main, ["info", "--config", "tinny"])
    assert r.exit_code == 2 and "did you mean tiny" in r.output
    r = CliRunner().invoke(main, ["info", "--config", str(tmp_path / "nope.yaml")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_info_prints_counts():
    r = CliRunner().invoke(main, ["info", "--config", "small"])
    assert r.exit_code == 0
    assert "total parameters:     11.01B" in r.output
    assert "activated parameters: 1.65B" in r.output


def test_presets_load_and_overrides_apply():
    for name in ("tiny", "small", "medium", "large", "super"):
        cfg = load_config(name)
        assert cfg.preset == name
    cfg = load_config("tiny", ["moe.top_k=3", "train.lr=1e-3", "moe.capacity_factor=null"])
    assert cfg.moe.top_k == 3 and cfg.train.lr == 1e-3 and cfg.moe.dropless


@pytest.mark.parametrize(
    "overrides,active",
    [
        ([], True),  # dropless pft with EP: on by default
        (["moe.capacity_factor=1.25"], False),  # capacity dropping: off unless set
        (["moe.capacity_factor=1.25", "moe.dedup_ep=true"], True),
        (["moe.dedup_ep=false"], False),
        (["moe.overlap_ep=true"], False),  # the two together measured slower
        (["moe.overlap_ep=true", "moe.dedup_ep=true"], True),
        (["parallel.ep=1"], False),
        (["moe.dispatcher=rbd"], False),
    ],
)
def test_dedup_ep_default_follows_the_dispatch(overrides, active):
    base = ["moe.dispatcher=pft", "parallel.ep=2", "moe.capacity_factor=null"]
    cfg = load_config("tiny", [*base, *overrides])
    assert dedup_ep_active(cfg.moe, cfg.moe.dispatcher, cfg.parallel.ep) is active


@pytest.mark.parametrize(
    "overrides,active",
    [
        ([], True),  # 64 experts, top-6 over 2 ranks: a token visits 98.6 % of them
        (["parallel.ep=4"], False),  # 84 %: a sixth of the slots would travel empty
        (["parallel.ep=4", "moe.dedup_fixed_slots=true"], True),
        (["moe.dedup_fixed_slots=false"], False),
        (["moe.capacity_factor=1.25", "moe.dedup_ep=true"], False),  # dropping: as set
        (["moe.capacity_factor=1.25", "moe.dedup_ep=true", "moe.dedup_fixed_slots=true"], True),
        (["moe.overlap_ep=true"], False),
        (["moe.dedup_ep=false"], False),
        (["parallel.ep=1"], False),
    ],
)
def test_dedup_fixed_slots_default(overrides, active):
    base = ["moe.dispatcher=pft", "parallel.ep=2", "moe.capacity_factor=null"]
    cfg = load_config("small", [*base, *overrides])
    assert dedup_fixed_active(cfg.moe, cfg.moe.dispatcher, cfg.parallel.ep) is active


@pytest.mark.parametrize("other", ["moe.dedup_ep=false", "moe.overlap_ep=true"])
def test_dedup_fixed_slots_set_true_needs_dedup_without_overlap(other):
    with pytest.raises(ConfigError, match="moe.dedup_fixed_slots=true needs moe.dedup_ep"):
        load_config("tiny", ["moe.dedup_fixed_slots=true", other])


def test_dedup_ep_set_true_needs_pft():
    with pytest.raises(ConfigError, match="moe.dedup_ep=true needs moe.dispatcher=pft"):
        load_config("tiny", ["moe.dispatcher=rbd", "moe.dedup_ep=true"])
    validate(load_config("tiny", ["moe.dispatcher=rbd"]))  # left null: no complaint
