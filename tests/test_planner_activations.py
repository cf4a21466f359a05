"""The planner's activation bytes per token against what autograd really saves.

The real model (bf16 on CPU, the PFT dispatcher on one rank) runs a forward under
saved-tensor hooks that add up every distinct storage kept for backward (parameters
excluded). Differences of layer counts isolate one attention+MoE layer, one attention+dense
layer and the LM head, so each term of `activation_bytes_per_token` is checked on its own.
"""

from __future__ import annotations

import pytest
import torch

from xmoe.config import load_config
from xmoe.model import Transformer
from xmoectl.costmodel import Layout, activation_bytes_per_token

B, S = 2, 64
SHAPE = [
    "model.hidden=128",
    "model.heads=4",
    "model.vocab_size=320",
    f"model.seq_len={S}",
    "moe.num_experts=8",
    "moe.top_k=2",
    "moe.expert_hidden=64",
    "moe.dispatcher=pft",
    "moe.capacity_factor=null",
]


def saved_bytes(overrides: list[str], dtype: torch.dtype = torch.bfloat16) -> int:
    cfg = load_config("tiny", SHAPE + overrides)
    torch.manual_seed(0)
    model = Transformer(cfg).to(dtype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
        return t

    tokens = torch.randint(0, cfg.model.vocab_size, (B, S))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, tokens)
    return sum(storages.values())


@pytest.mark.parametrize(
    "kind",
    [
        ["moe.activation=gelu", "moe.num_shared_experts=0"],
        ["moe.activation=swiglu", "moe.num_shared_experts=1"],
    ],
    ids=["gelu", "swiglu+shared"],
)
def test_per_token_activation_model_matches_autograd(kind):
    T = B * S
    moe2 = saved_bytes(kind + ["model.layers=2", "model.dense_layers=0"])
    moe4 = saved_bytes(kind + ["model.layers=4", "model.dense_layers=0"])
    dense2 = saved_bytes(kind + ["model.layers=2", "model.dense_layers=2"])
    dense4 = saved_bytes(kind + ["model.layers=4", "model.dense_layers=4"])
    cfg = load_config("tiny", SHAPE + kind)
    per = activation_bytes_per_token(cfg, Layout(ep=1, micro_batch=B), imbalance=1.5)
    moe_layer = (moe4 - moe2) / 2 / T
    dense_layer = (dense4 - dense2) / 2 / T
    head = (dense2 - 2 * (dense4 - dense2) / 2) / T
    # one rank holds every expert, so routing skew moves no rows: the count is exact
    assert per["attention"] + per["moe"] == pytest.approx(moe_layer, rel=0.05)
    assert per["attention"] + per["dense_mlp"] == pytest.approx(dense_layer, rel=0.05)
    assert per["head"] == pytest.approx(head, rel=0.05)


def _tp_saved(rank: int, world: int, out: str) -> None:
    import json

    import torch.distributed as dist

    from xmoe.parallel.groups import create_parallel_state

    sizes = {}
    for L, dense in ((2, 0), (4, 0), (2, 2), (4, 4)):
        over = SHAPE + [
            "parallel.tp=2",
            "parallel.ep=1",
            f"model.layers={L}",
            f"model.dense_layers={dense}",
        ]
        cfg = load_config("tiny", over)
        state = create_parallel_state(cfg, rank, world)
        torch.manual_seed(0)
        model = Transformer(cfg, state).to(torch.bfloat16)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor, params=params, storages=storages) -> torch.Tensor:
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
            return t

        tokens = torch.randint(
            0, cfg.model.vocab_size, (B, S), generator=torch.Generator().manual_seed(1)
        )
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(tokens, tokens)
        sizes[f"{L},{dense}"] = sum(storages.values())
    if rank == 0:
        with open(out, "w") as f:
            json.dump(sizes, f)
    dist.barrier()


def test_tensor_parallel_activation_model_matches_autograd(tmp_path):
    import json

    from ep_spawn import run_ranks

    out = tmp_path / "tp.json"
    run_ranks(2, _tp_saved, str(out))
    got = json.loads(out.read_text())
    T = B * S  # tokens of the micro-batch; each TP rank holds T/2 outside attention and MLPs
    cfg = load_config("tiny", SHAPE)
    per = activation_bytes_per_token(cfg, Layout(tp=2, ep=1, micro_batch=B), imbalance=1.5)
    moe_layer = (got["4,0"] - got["2,0"]) / 2 / T
    dense_layer = (got["4,4"] - got["2,2"]) / 2 / T
    assert per["attention"] + per["moe"] == pytest.approx(moe_layer, rel=0.05)
    assert per["attention"] + per["dense_mlp"] == pytest.approx(dense_layer, rel=0.05)


def test_recompute_permute_saves_exactly_the_expert_input_rows():
    """moe.recompute_permute drops the [T*k, D] rows each MoE layer kept, and nothing
    else changes (fp32: the CPU's _grouped_mm, the path that rebuilds the rows)."""
    T = B * S
    over = ["moe.activation=gelu", "model.layers=2", "model.dense_layers=0"]
    over += ["moe.grouped_gemm=torch"]
    kept = saved_bytes(over, torch.float32)
    rebuilt = saved_bytes([*over, "moe.recompute_permute=true"], torch.float32)
    cfg = load_config("tiny", SHAPE + over)
    k, D = cfg.moe.top_k, cfg.model.hidden
    assert kept - rebuilt == 2 * T * k * D * 4  # two MoE layers, fp32 rows
    on = load_config("tiny", SHAPE + [*over, "moe.recompute_permute=true"])
    per_kept = activation_bytes_per_token(cfg, Layout(ep=1, micro_batch=B), imbalance=1.5)
    per_on = activation_bytes_per_token(on, Layout(ep=1, micro_batch=B), imbalance=1.5)
    assert per_kept["moe"] - per_on["moe"] == k * D * 2  # the model counts bf16 rows


def test_fused_lm_loss_head_matches_autograd():
    """model.fused_lm_loss: the head keeps the two gradients made in forward (its input's
    per token, its weight's once), as the cost model counts."""
    from xmoe.kernels.cross_entropy import CHUNK_BYTES
    from xmoectl.costmodel import LOSS_CHUNK_BYTES

    assert LOSS_CHUNK_BYTES == CHUNK_BYTES
    T = B * S
    kind = ["moe.activation=gelu", "moe.num_shared_experts=0", "model.fused_lm_loss=true"]
    dense2 = saved_bytes(kind + ["model.layers=2", "model.dense_layers=2"])
    dense4 = saved_bytes(kind + ["model.layers=4", "model.dense_layers=4"])
    cfg = load_config("tiny", SHAPE + kind)
    per = activation_bytes_per_token(cfg, Layout(ep=1, micro_batch=B), imbalance=1.5)
    head = dense2 - 2 * (dense4 - dense2) / 2
    # besides the head, outside the layers: the embedding's int64 token ids and the RoPE
    # cos/sin tables every layer shares (fp32, [S, head_dim / 2] each)
    D, heads = cfg.model.hidden, cfg.model.heads
    shared = 8 * T + 2 * 4 * S * (D // heads // 2)
    assert per["head"] * T + per["head_fixed"] + shared == head
    unfused = activation_bytes_per_token(
        load_config("tiny", SHAPE + kind[:2]), Layout(ep=1, micro_batch=B), imbalance=1.5
    )
    assert per["head"] < unfused["head"] and per["loss_peak"] == 0 < unfused["loss_peak"]
