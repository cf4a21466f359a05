"""Parameter and FLOP counts against a hand count and against the real model."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from xmoe.config import load_config
from xmoe.flops import datasheet_peak_tflops, flops_breakdown, flops_per_token, param_counts
from xmoe.model import Transformer

SMALL = [
    "model.vocab_size=100",
    "model.hidden=8",
    "model.layers=2",
    "model.dense_layers=1",
    "model.heads=2",
    "model.ffn_hidden=16",
    "model.seq_len=4",
    "moe.num_experts=4",
    "moe.top_k=2",
    "moe.expert_hidden=6",
    "moe.num_shared_experts=1",
]


def test_param_counts_by_hand():
    c = param_counts(load_config("tiny", SMALL))
    # embed 100*8, head 100*8, attention 2 layers * 4*8*8, dense MLP 3*8*16,
    # router 4*8, routed 4 experts * 3*8*6, shared 3*8*6, norms (2*2+1)*8
    assert c["total"] == 800 + 800 + 512 + 384 + 32 + 576 + 144 + 40 == 3288
    # 2 of 4 routed experts inactive per token: 2 * 3*8*6 = 288
    assert c["activated"] == 3288 - 288


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_param_counts_match_the_model(preset):
    overrides = SMALL if preset == "small" else []
    cfg = load_config("tiny", overrides + ["model.tie_embeddings=false"])
    model = Transformer(cfg)
    assert param_counts(cfg)["total"] == sum(p.numel() for p in model.parameters())


def test_flops_by_hand():
    cfg = load_config("tiny", SMALL)
    # forward per token: attention projections 2 layers * 2*4*64 = 1024; scores
    # 2 layers * 2 matmuls * 2 * 8 * (4+1)/2 = 160; dense 2*3*8*16 = 768; router 2*8*4 = 64;
    # routed top-2 * 2*3*8*6 = 576; shared 2*3*8*6 = 288; LM head 2*8*100 = 1600
    assert flops_per_token(cfg) == 3 * (1024 + 160 + 768 + 64 + 576 + 288 + 1600) == 13440
    # a quarter of the routed assignments dropped: routed part 576 -> 432
    assert flops_per_token(cfg, dropped_fraction=0.25) == 13440 - 3 * 144


def test_gelu_experts_count_two_matrices():
    cfg = load_config("tiny", SMALL + ["moe.activation=gelu"])
    assert flops_breakdown(cfg)["routed_experts"] == 2 * 2 * 2 * 8 * 6
    assert param_counts(cfg)["routed_experts"] == 4 * 2 * 8 * 6


def test_flops_match_torch_flop_counter():
    """Every matmul of a real forward, counted by torch, equals our count (attention scores
    aside: the CPU attention kernel is not counted by torch; checked by hand above)."""
    cfg = load_config(
        "tiny",
        [
            "model.seq_len=16",
            "model.hidden=32",
            "model.heads=4",
            "moe.expert_hidden=16",
            "model.ffn_hidden=48",
            "moe.grouped_gemm=loop",
        ],
    )
    model = Transformer(cfg)
    B, S = 2, cfg.model.seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (B, S))
    with FlopCounterMode(display=False) as counter:
        model(tokens)
    counts = counter.get_flop_counts()["Global"]
    sdpa = sum(v for k, v in counts.items() if "attention" in str(k))
    measured = (counter.get_total_flops() - sdpa) / (B * S)
    ours = flops_breakdown(cfg)
    expected = sum(v for k, v in ours.items() if k != "attention_scores")
    assert measured == pytest.approx(expected, rel=1e-9)


def test_datasheet_peaks():
    assert datasheet_peak_tflops("NVIDIA H200") == 989.0
    assert datasheet_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert datasheet_peak_tflops("AMD Instinct MI250X") == 191.5
    assert datasheet_peak_tflops("Intel Xeon") is None
