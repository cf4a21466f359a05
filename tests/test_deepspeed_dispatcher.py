"""DeepSpeed's own MoE layer behind our MoELayer: same math as the reference, and it trains."""

import pytest
import torch

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
    """DeepSpeed's engine wraps its own MoE layer with our EP groups (2 gloo ranks)."""
    from helpers import read_metrics, run_xmoe

    args = ["train", "--config", "tiny", "--run-dir", str(tmp_path)]
    for kv in (
        "moe.dispatcher=deepspeed",
        "parallel.ep=2",
        "moe.capacity_factor=1.25",
        "train.global_batch=16",
        "train.steps=8",
        "train.log_interval=1",
    ):
        args += ["--set", kv]
    proc = run_xmoe(args, nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert recs[-1]["lm_loss"] < recs[0]["lm_loss"] - 0.5
