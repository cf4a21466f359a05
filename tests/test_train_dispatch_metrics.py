"""The dispatcher's counters in metrics.jsonl: summed over layers, micro-batches and ranks."""

from __future__ import annotations

import pytest
from helpers import read_metrics, run_xmoe

from xmoe.train.metrics import (
    add_dispatch_stats,
    dispatch_record,
    format_line,
    merge_dispatch_sums,
)


def test_dispatch_record_sums_counts_and_recomputes_ratios():
    layer_a = {"routed_rows": 6.0, "pilot_rows": 3.0, "dedup_ratio": 2.0, "capacity": 4.0}
    layer_b = {"routed_rows": 2.0, "pilot_rows": 2.0, "dedup_ratio": 1.0, "capacity": 8.0}
    step1: dict[str, float] = {}
    add_dispatch_stats(step1, layer_a)
    add_dispatch_stats(step1, {**layer_b, "flag": True, "note": "x"})  # not counters
    step2: dict[str, float] = {}
    add_dispatch_stats(step2, layer_a)
    add_dispatch_stats(step2, layer_a)
    window = merge_dispatch_sums(step1, step2)
    d = dispatch_record(window, steps=2, name="rbd")
    assert d["name"] == "rbd"
    assert d["routed_rows"] == (6 + 2 + 6 + 6) / 2 and d["pilot_rows"] == (3 + 2 + 3 + 3) / 2
    # the ratio of the sums (20 / 11), not a sum or mean of the layers' ratios
    assert d["dedup_ratio"] == 20 / 11
    assert d["capacity"] == (4 + 8 + 4 + 4) / 4  # a per-layer size: averaged over forwards
    assert set(d) == {"name", "routed_rows", "pilot_rows", "dedup_ratio", "capacity"}
    assert dispatch_record({}, steps=0, name="pft") == {"name": "pft"}
    # plain TP: each TP rank dispatched the same tokens
    assert dispatch_record(window, steps=2, name="rbd", copies=2)["routed_rows"] == 5.0


def _record(dispatcher: dict) -> dict:
    return {
        "step": 5,
        "loss": 1.0,
        "lm_loss": 1.0,
        "aux_loss": 0.0,
        "z_loss": 0.0,
        "lr": 1e-3,
        "grad_norm": 1.0,
        "tokens_per_s": 10.0,
        "tflops_per_gpu": 0.1,
        "mfu": None,
        "peak_mem_gib": 0.5,
        "dropped_fraction": 0.0,
        "expert_load_max_mean": [1.0],
        "dispatcher": dispatcher,
    }


def test_stdout_line_shows_inter_node_rows_only_for_rbd():
    rbd = {"name": "rbd", "inter_node_rows": 637.0, "pft_inter_node_rows": 783.0}
    line = format_line(_record({**rbd, "dedup_ratio": 1.22}))
    assert line.endswith("| inter-node rows/step 637 (pft 783) dedup 1.22x")
    pft = {"name": "pft", "rows": 10.0, "sent_rows": 10.0, "a2a_bytes": 5.0}
    assert "inter-node" not in format_line(_record(pft))
    assert "inter-node" not in format_line(_record({}))


SEQ, BATCH, STEPS = 32, 8, 4


def test_rbd_counters_in_metrics_four_ranks_two_nodes(tmp_path):
    """4 ranks as 2 virtual nodes x 2, EP=4, RBD, 2 micro-batches a step, windows of 2."""
    from xmoe.config import load_config

    proc = run_xmoe(
        [
            "train",
            "--config",
            "tiny",
            "--run-dir",
            str(tmp_path),
            *("--set", "parallel.ep=4", "--set", "parallel.node_size=2"),
            *("--set", "moe.dispatcher=rbd", "--set", f"model.seq_len={SEQ}"),
            *("--set", f"train.global_batch={BATCH}", "--set", "train.micro_batch=1"),
            *("--set", f"train.steps={STEPS}", "--set", "train.log_interval=2"),
            *("--set", "train.save_interval=0"),
        ],
        nproc=4,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cfg = load_config("tiny")
    moe_layers = cfg.model.layers - cfg.model.dense_layers
    # every (token, layer) of a step, all ranks: dropless, so each routes top_k rows
    token_layers = BATCH * SEQ * moe_layers
    row_bytes = cfg.model.hidden * 4  # fp32 on CPU
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [2, 4]
    for r in recs:
        d = r["dispatcher"]
        assert d["name"] == "rbd"
        # per-step averages over the window of sums over ranks, layers and micro-batches
        assert d["routed_rows"] == d["rows"] == token_layers * cfg.moe.top_k
        assert d["dedup_ratio"] == d["routed_rows"] / d["pilot_rows"]
        # 2 nodes, top-2: each token sends 1 or 2 pilots, at most one of them across, and
        # that one carries 1 or 2 replicas (PFT's copies); deduplication happened
        assert token_layers <= d["pilot_rows"] <= 2 * token_layers
        assert 0 < d["inter_node_rows"] < d["pft_inter_node_rows"] <= 2 * d["inter_node_rows"]
        assert d["inter_node_rows"] <= token_layers
        # tokens with both experts on one node: on the other node (PFT's extra copies) or own
        assert d["routed_rows"] - d["pilot_rows"] >= d["pft_inter_node_rows"] - d["inter_node_rows"]
        meta_bytes = 8 + 4  # slot word and fp32 gate weight per replica crossing nodes
        assert d["inter_node_bytes"] == pytest.approx(
            d["inter_node_rows"] * row_bytes + d["pft_inter_node_rows"] * meta_bytes
        )
        assert d["intra_node_bytes"] == pytest.approx(d["intra_node_rows"] * row_bytes)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("step ")]
    assert len(lines) == 2
    for ln, r in zip(lines, recs):
        d = r["dispatcher"]
        assert f"inter-node rows/step {d['inter_node_rows']:.0f}" in ln
        assert f"dedup {d['dedup_ratio']:.2f}x" in ln
