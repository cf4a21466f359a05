"""DeepSpeed's own MoE layer behind our MoELayer: same math as the reference, it trains, and
with EP > 1 it exchanges tokens over our expert-parallel groups, engine or not."""

import pytest
import torch
import torch.distributed as dist
from ep_spawn import run_ranks

from xmoe.config import load_config
from xmoe.moe.layer import MoELayer

BASE = ["model.hidden=16", "moe.expert_hidden=8", "moe.num_shared_experts=1"]


def _copy_into_deepspeed(ref: MoELayer, ds: MoELayer) -> None:
    """Our stacked expert weights and router into DeepSpeed's per-expert modules and gate."""
    moe = ds.dispatcher.moe.deepspeed_moe
    with torch.no_grad():
        moe.gate.wg.weight.copy_(ref.router.weight_ED)
        for e, expert in enumerate(moe.experts.deepspeed_experts):
            expert.w1.weight.copy_(ref.experts.w1_EFD[e])
            expert.w2.weight.copy_(ref.experts.w2_EDF[e])
            if expert.w3 is not None:
                expert.w3.weight.copy_(ref.experts.w3_EFD[e])
        ds.shared.load_state_dict(ref.shared.state_dict())


# DeepSpeed's top-1 gate weights by the raw probability: our renormalize=false
@pytest.mark.parametrize(
    "top_k,activation,renorm", [(3, "swiglu", True), (2, "gelu", True), (1, "swiglu", False)]
)
def test_deepspeed_dropless_equals_reference(top_k, activation, renorm):
    over = [
        *BASE,
        f"moe.top_k={top_k}",
        f"moe.activation={activation}",
        f"moe.renormalize={renorm}",
    ]
    torch.manual_seed(0)
    ref = MoELayer(load_config("tiny", over)).double()
    ds = MoELayer(load_config("tiny", [*over, "moe.dispatcher=deepspeed"])).double()
    assert ds.experts is None  # DeepSpeed's layer brings its own experts
    _copy_into_deepspeed(ref, ds)
    x = torch.randn(30, 16, dtype=torch.float64)
    g = torch.randn(30, 16, dtype=torch.float64)
    ys, gx = [], []
    for layer in (ref, ds):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        (y * g).sum().backward()
        ys.append(y)
        gx.append(xi.grad)
    torch.testing.assert_close(ys[1], ys[0])
    torch.testing.assert_close(gx[1], gx[0])
    moe = ds.dispatcher.moe.deepspeed_moe
    torch.testing.assert_close(moe.gate.wg.weight.grad, ref.router.weight_ED.grad)
    torch.testing.assert_close(
        moe.experts.deepspeed_experts[1].w2.weight.grad, ref.experts.w2_EDF.grad[1]
    )
    if top_k >= 3:  # DeepSpeed's top-1/top-2 gates count only the first choice in the aux loss
        torch.testing.assert_close(ds.last_aux_loss, ref.last_aux_loss.to(ds.last_aux_loss.dtype))
    assert torch.equal(
        ds.last_stats["tokens_per_expert"].cpu(), ref.last_stats["tokens_per_expert"]
    )


def test_deepspeed_dispatcher_trains_with_capacity():
    torch.manual_seed(0)
    cfg = load_config("tiny", [*BASE, "moe.dispatcher=deepspeed", "moe.capacity_factor=1.0"])
    layer = MoELayer(cfg)
    x = torch.randn(64, 16)
    target = torch.tanh(x @ torch.randn(16, 16))
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = (layer(x) - target).pow(2).mean() + 0.01 * layer.last_aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert 0 <= layer.last_stats["dropped_fraction"] < 1


def test_deepspeed_dispatcher_in_the_trainer_with_ep2(tmp_path):
    """The trainer on DeepSpeed's engine wraps DeepSpeed's MoE layer at EP=2 (2 gloo ranks).

    The engine sets every MoE module's parallelism again after the layer took our groups;
    that must neither crash nor swap the groups, and the run must learn.
    """
    from helpers import read_metrics, run_xmoe

    args = ["train", "--config", "tiny", "--run-dir", str(tmp_path)]
    for kv in (
        "moe.dispatcher=deepspeed",
        "parallel.ep=2",
        "moe.capacity_factor=1.25",
        "model.seq_len=32",
        "model.layers=2",
        "train.global_batch=16",
        "train.steps=5",
        "train.log_interval=1",
    ):
        args += ["--set", kv]
    proc = run_xmoe(args, nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "override an existing ep_group" not in proc.stderr
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == list(range(1, 6))
    assert all(0 < r["dropped_fraction"] < 0.5 for r in recs)
    assert recs[-1]["lm_loss"] < recs[0]["lm_loss"] - 0.3, [r["lm_loss"] for r in recs]


def _forward_then_engine(rank: int, world: int) -> None:
    from deepspeed.utils import groups as ds_groups

    from xmoe.model import Transformer
    from xmoe.parallel.groups import create_parallel_state
    from xmoe.train.engine import build_engine

    over = ["moe.dispatcher=deepspeed", "parallel.ep=2", "model.layers=2", "model.seq_len=16"]
    cfg = load_config("tiny", [*over, "train.global_batch=16"])
    state = create_parallel_state(cfg, rank, world)
    torch.manual_seed(0)
    model = Transformer(cfg, state)
    tokens_BS = torch.randint(
        0, cfg.model.vocab_size, (2, 17), generator=torch.Generator().manual_seed(rank)
    )
    # a forward before any engine exists: the layer already exchanges over our EP group
    model(tokens_BS[:, :-1], tokens_BS[:, 1:])
    engine = build_engine(cfg, model, state)  # sets every MoE module's parallelism again

    name = "ep_size_2"
    (layer,) = model.moe_layers()
    ds_moe = layer.dispatcher.moe
    # the very groups xmoe.parallel built: DeepSpeed made none of its own
    assert ds_moe.deepspeed_moe.ep_group is state.ep_group
    assert ds_moe.deepspeed_moe.gate.ep_group is state.ep_group
    assert engine.expert_parallel_group[name] is state.ep_group
    assert engine.expert_data_parallel_group[name] is state.expert_dp_group
    assert dist.get_process_group_ranks(state.ep_group) == [0, 1]
    assert dist.get_process_group_ranks(state.expert_dp_group) == [rank]

    loss, _ = engine(tokens_BS[:, :-1], tokens_BS[:, 1:])
    engine.backward(loss)
    engine.step()
    assert torch.isfinite(loss)

    # a group table that no longer matches our layout is refused, not used
    ours = ds_groups._EXPERT_DATA_PARALLEL_GROUP[name]
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = dist.group.WORLD
    with pytest.raises(RuntimeError, match=r"expert_dp group ep_size_2 holds ranks \[0, 1\]"):
        ds_moe.set_deepspeed_parallelism()
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = ours
    with pytest.raises(RuntimeError, match="use_data_before_expert_parallel"):
        ds_moe.set_deepspeed_parallelism(use_data_before_expert_parallel_=True)
    ds_moe.set_deepspeed_parallelism()  # our own groups: a check that passes, nothing reset


def test_deepspeed_layer_keeps_our_ep_groups_through_the_engine():
    """Forward without an engine, then DeepSpeed's engine: same groups, no second setup."""
    run_ranks(2, _forward_then_engine)
