"""Tensor-parallel layouts: the TP x EP x DP rank lists, and bad layouts refused in one line."""

import pytest
from helpers import run_xmoe

from xmoe.config import ConfigError, load_config, validate_layout
from xmoe.parallel.groups import build_groups


def test_layout_tp_innermost_ep_over_tp_and_dp():
    g = build_groups(8, tp=2, ep=4, node_size=4)
    assert g["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["dp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert g["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # TP ranks are extra EP ranks (SSMB)
    assert g["expert_dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert g["node_local"] == [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.mark.parametrize(
    ("overrides", "world", "needle"),
    [
        (["parallel.tp=2", "parallel.node_size=3"], 6, "inside one node"),
        (["parallel.tp=4"], 6, "does not divide the world size 6"),
        (
            ["parallel.tp=2", "train.micro_batch=1", "model.seq_len=7"],
            2,
            "divisible by parallel.tp=2",
        ),
        (["parallel.tp=2", "train.global_batch=8", "train.micro_batch=8"], 4, "global_batch"),
    ],
)
def test_bad_layouts_refused(overrides, world, needle):
    cfg = load_config("tiny", overrides)
    with pytest.raises(ConfigError, match=needle):
        validate_layout(cfg, world)


def test_tp_group_must_fit_in_a_node():
    with pytest.raises(ConfigError, match="inside one node"):
        build_groups(8, tp=4, ep=2, node_size=2)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["parallel.tp=3"], "does not divide model.heads=4"),
        (["parallel.tp=2", "model.ffn_hidden=343"], "model.ffn_hidden=343"),
        (["parallel.tp=2", "moe.dispatcher=deepspeed"], "moe.dispatcher=deepspeed"),
    ],
)
def test_bad_tp_configs_refused(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("tiny", overrides)


def test_cli_refuses_bad_tp_in_one_line(tmp_path):
    proc = run_xmoe(
        ["train", "--config", "tiny", "--run-dir", str(tmp_path / "r"), "--set", "parallel.tp=2"]
    )  # one process cannot hold a TP group of 2
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "parallel.tp=2" in lines[0] and "Traceback" not in proc.stderr
