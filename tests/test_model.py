"""The transformer: causality, layer kinds, loss parts, initialisation independent of EP."""

import torch
import torch.nn.functional as F

from xmoe.config import load_config
from xmoe.model import Transformer
from xmoe.moe.experts import DenseMLP, GroupedExperts
from xmoe.moe.layer import MoELayer


def _cfg(*overrides):
    return load_config(
        "tiny",
        [
            "model.hidden=32",
            "model.seq_len=16",
            "moe.expert_hidden=16",
            "model.ffn_hidden=48",
            *overrides,
        ],
    )


def test_layers_dense_then_moe_and_logits_shape():
    torch.manual_seed(0)
    model = Transformer(_cfg("model.dense_layers=2"))
    kinds = [type(b.ffn) for b in model.layers]
    assert kinds == [DenseMLP, DenseMLP, MoELayer, MoELayer]
    logits = model(torch.randint(0, 320, (2, 16)))
    assert logits.shape == (2, 16, 320)


def test_causal():
    torch.manual_seed(0)
    model = Transformer(_cfg()).double()
    t = torch.randint(0, 320, (1, 16))
    t2 = t.clone()
    t2[0, 10:] = (t2[0, 10:] + 1) % 320
    a, b = model(t), model(t2)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_loss_is_lm_plus_scaled_router_losses():
    torch.manual_seed(0)
    cfg = _cfg("moe.aux_loss_coef=0.1", "moe.z_loss_coef=0.01")
    model = Transformer(cfg)
    t = torch.randint(0, 320, (2, 17))
    total, parts = model(t[:, :-1], t[:, 1:])
    lm = F.cross_entropy(model(t[:, :-1]).reshape(-1, 320), t[:, 1:].reshape(-1))
    torch.testing.assert_close(parts.lm_loss, lm)
    n = len(model.moe_layers())
    torch.testing.assert_close(total, lm + 0.1 * n * parts.aux_loss + 0.01 * n * parts.z_loss)
    total.backward()
    assert model.moe_layers()[0].router.weight_ED.grad.abs().sum() > 0
    assert model.moe_layers()[0].shared.w1.weight.grad.abs().sum() > 0  # shared experts compute


def test_fused_lm_loss_equals_the_unfused_head():
    """model.fused_lm_loss: the same loss and every parameter's gradient (fp64), tied
    embeddings included."""
    t = torch.randint(0, 320, (2, 17))
    for tie in ("false", "true"):
        results = []
        for fused in ("false", "true"):
            torch.manual_seed(0)
            cfg = _cfg(f"model.fused_lm_loss={fused}", f"model.tie_embeddings={tie}")
            model = Transformer(cfg).double()
            loss, parts = model(t[:, :-1], t[:, 1:])
            loss.backward()
            results.append((loss, parts.lm_loss, [p.grad for p in model.parameters()]))
        (loss_a, lm_a, ga), (loss_b, lm_b, gb) = results
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lm_b, lm_a, rtol=1e-12, atol=1e-12)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_activation_checkpointing_same_gradients():
    t = torch.randint(0, 320, (2, 17))
    grads = []
    for ckpt in ("false", "true"):
        torch.manual_seed(0)
        model = Transformer(_cfg(f"train.activation_checkpointing={ckpt}")).double()
        loss, _ = model(t[:, :-1], t[:, 1:])
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_expert_init_is_independent_of_ep():
    full = GroupedExperts(8, 16, 8, init_seed=7)
    half = GroupedExperts(4, 16, 8, first_expert=4, init_seed=7, ep_size=2)
    torch.testing.assert_close(full.w1_EFD[4:], half.w1_EFD)
    torch.testing.assert_close(full.w2_EDF[4:], half.w2_EDF)
    assert half.w1_EFD.allreduce is False and half.w1_EFD.group_name == "ep_size_2"
    # building experts leaves the global RNG alone, so dense init is EP-independent too
    torch.manual_seed(3)
    GroupedExperts(8, 16, 8)
    a = torch.rand(1)
    torch.manual_seed(3)
    b = torch.rand(1)
    assert torch.equal(a, b)


def test_grouped_experts_empty_experts():
    ex = GroupedExperts(3, 8, 4, activation="gelu").double()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    y = ex(x, [0, 5, 0])
    ref = F.gelu(x @ ex.w1_EFD[1].t()) @ ex.w2_EDF[1].t()
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    assert torch.all(ex.w1_EFD.grad[0] == 0) and torch.all(ex.w1_EFD.grad[2] == 0)
