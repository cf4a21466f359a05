"""Router: exact capacity ranking, balance losses, expert bias."""

import math

import pytest
import torch

from xmoe.config import MoEConfig, capacity
from xmoe.moe.router import (
    Router,
    capacity_keep_mask,
    logits_bf16_grads,
    router_logits,
    split_bf16,
)


def _brute_keep(ids, probs, E, cap):
    T, K = ids.shape
    keep = torch.zeros(T, K, dtype=torch.bool)
    for e in range(E):
        cands = [(-probs[t, k].item(), t, k) for t in range(T) for k in range(K) if ids[t, k] == e]
        for _, t, k in sorted(cands)[:cap]:
            keep[t, k] = True
    return keep


@pytest.mark.parametrize("T,K,E,cap", [(50, 2, 8, 7), (33, 4, 4, 1), (1, 1, 1, 1), (40, 3, 6, 100)])
def test_capacity_mask_matches_brute_force(T, K, E, cap):
    g = torch.Generator().manual_seed(T * 7 + K)
    probs = torch.rand(T, E, generator=g).softmax(-1)
    top_p, ids = probs.topk(K, dim=-1)
    # many exact ties: quantise the probabilities so tie-breaking (token, then k) matters
    top_p = (top_p * 8).round() / 8
    keep = capacity_keep_mask(ids, top_p, E, cap)
    assert torch.equal(keep, _brute_keep(ids, top_p, E, cap))


def test_capacity_mask_exact_beyond_fp16_range():
    # 5000 assignments on one expert, capacity 4097: an fp16 cumsum cannot count this far
    T = 5000
    ids = torch.zeros(T, 1, dtype=torch.long)
    probs = torch.ones(T, 1) * 0.5
    keep = capacity_keep_mask(ids, probs, 2, 4097)
    assert int(keep.sum()) == 4097
    assert keep[:4097].all() and not keep[4097:].any()  # equal probabilities: lowest tokens win


def test_capacity_formula():
    cfg = MoEConfig(num_experts=8, top_k=2, capacity_factor=1.25)
    assert capacity(100, cfg) == math.ceil(100 * 2 * 1.25 / 8)
    assert capacity(100, MoEConfig(capacity_factor=None, top_k=2)) == 200


def test_router_outputs_and_losses():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, renormalize=True)
    r = Router(cfg, 16)
    x = torch.randn(32, 16)
    out = r(x)
    probs = (x @ r.weight_ED.t()).softmax(-1)
    p, ids = probs.topk(2, -1)
    assert torch.equal(out.routing.topk_ids_TK, ids)
    torch.testing.assert_close(out.routing.topk_weights_TK, p / p.sum(-1, keepdim=True))
    assert out.routing.keep_TK is None and out.dropped_fraction == 0.0
    f = torch.bincount(ids.reshape(-1), minlength=4).float() / 64
    torch.testing.assert_close(out.aux_loss, 4 * (f * probs.mean(0)).sum())
    torch.testing.assert_close(out.z_loss, torch.logsumexp(x @ r.weight_ED.t(), -1).square().mean())
    assert torch.equal(out.tokens_per_expert_E, torch.bincount(ids.reshape(-1), minlength=4))


def test_aux_loss_is_one_when_perfectly_balanced():
    cfg = MoEConfig(num_experts=4, top_k=1)
    r = Router(cfg, 4)
    with torch.no_grad():
        r.weight_ED.copy_(torch.eye(4) * 50)
    out = r(torch.eye(4).repeat(3, 1))
    torch.testing.assert_close(out.aux_loss, torch.tensor(1.0), atol=1e-6, rtol=0)


def test_expert_bias_changes_selection_not_weights():
    cfg = MoEConfig(
        num_experts=4, top_k=1, expert_bias=True, expert_bias_rate=0.5, renormalize=False
    )
    r = Router(cfg, 8)
    x = torch.randn(64, 8)
    before = r(x)
    load = before.tokens_per_expert_E
    r.update_expert_bias(load)
    expected = torch.sign(load.double().mean() - load.double()).long()
    assert torch.equal(r.bias_steps_E, expected)
    r.bias_steps_E.zero_()
    r.bias_steps_E[2] = 10  # +5.0 on probabilities <= 1: expert 2 always wins
    out = r(x)
    assert torch.all(out.routing.topk_ids_TK == 2)
    probs = (x @ r.weight_ED.t()).softmax(-1)
    torch.testing.assert_close(out.routing.topk_weights_TK[:, 0], probs[:, 2])
    assert "bias_steps_E" in r.state_dict()


def test_dropping_reports_fraction():
    torch.manual_seed(3)
    cfg = MoEConfig(num_experts=4, top_k=2, capacity_factor=0.5)
    r = Router(cfg, 8)
    out = r(torch.randn(40, 8))
    cap = capacity(40, cfg)
    kept = out.routing.keep_TK
    per_expert = torch.bincount(out.routing.topk_ids_TK[kept], minlength=4)
    assert torch.all(per_expert <= cap)
    assert out.dropped_fraction == pytest.approx(1 - kept.sum().item() / 80)


class _SliceRouter(Router):
    """Routes one slice of a batch; its losses are normalised by the whole batch's load."""

    def __init__(self, cfg, hidden, batch_load_E, batch_tokens):
        super().__init__(cfg, hidden)
        self.batch = (batch_load_E, batch_tokens)
        self.calls = []

    def reduce_load(self, load_E, tokens):
        self.calls.append((load_E.clone(), tokens))
        return self.batch


def test_reduce_load_hook_makes_slice_losses_add_up_to_the_batch():
    torch.manual_seed(1)
    cfg = MoEConfig(num_experts=6, top_k=2)
    whole = Router(cfg, 16)
    x = torch.randn(30, 16)
    full = whole(x)
    (full.aux_loss + full.z_loss).backward()
    parts, grads = [], []
    for rows in (slice(0, 11), slice(11, 30)):
        r = _SliceRouter(cfg, 16, full.tokens_per_expert_E, 30)
        r.load_state_dict(whole.state_dict())
        out = r(x[rows])
        (out.aux_loss + out.z_loss).backward()
        # the hook saw this slice's own load and token count
        assert torch.equal(r.calls[0][0], out.tokens_per_expert_E)
        assert r.calls[0][1] == rows.stop - rows.start
        parts.append(torch.stack([out.aux_loss, out.z_loss]))
        grads.append(r.weight_ED.grad)
    torch.testing.assert_close(parts[0] + parts[1], torch.stack([full.aux_loss, full.z_loss]))
    torch.testing.assert_close(grads[0] + grads[1], whole.weight_ED.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_router_logits_match_fp32_linear_and_keep_no_fp32_copy(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 16, generator=g).to(dtype).requires_grad_()
    w = torch.randn(8, 16, generator=g).to(dtype).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = router_logits(x, w)
    assert y.dtype == torch.float32
    # only the operands themselves are kept for backward, never an fp32 copy of x
    assert sum(t.numel() * t.element_size() for t in saved) == (37 + 8) * 16 * x.element_size()
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = torch.nn.functional.linear(x2.float(), w2.float())
    y2.backward(gy)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    torch.testing.assert_close(w.grad, w2.grad, rtol=0, atol=0)


def test_router_bf16_gradients_from_split_halves_are_fp32_accurate():
    """The GPU's bf16 router backward (the fp32 gradient split in two bf16 halves) is as
    accurate as fp32 matmuls, far beyond a gradient rounded to bf16 once."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 64, generator=g).bfloat16()
    w = torch.randn(8, 64, generator=g).bfloat16()
    g_TE = torch.randn(300, 8, generator=g) * torch.logspace(-6, 0, 8)
    hi_lo = split_bf16(g_TE)
    assert hi_lo.dtype == torch.bfloat16 and hi_lo.shape == (300, 16)
    rel = ((hi_lo[:, :8].float() + hi_lo[:, 8:].float() - g_TE).abs() / g_TE.abs()).max()
    assert rel < 2**-15
    gx, gw = logits_bf16_grads(g_TE, x, w, True, True)
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    gx_ref = g_TE.double() @ w.double()
    gw_ref = g_TE.double().t() @ x.double()
    # gx is rounded to bf16 once, at the end: within half a bf16 unit
    torch.testing.assert_close(gx.double(), gx_ref, rtol=2**-8, atol=1e-6)
    # in fp32 before the final rounding: the split loses ~2^-16, one bf16 rounding 2^-9
    gw32 = logits_bf16_grads(g_TE, x, w.float(), False, True)[1]
    err = ((gw32.double() - gw_ref).norm() / gw_ref.norm()).item()
    once = g_TE.bfloat16().double().t() @ x.double()
    err_once = ((once - gw_ref).norm() / gw_ref.norm()).item()
    assert err < 1e-5 < err_once, (err, err_once)
    assert logits_bf16_grads(g_TE, x, w, False, False) == (None, None)
