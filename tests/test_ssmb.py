"""The MoE block under SSMB and plain TP on real gloo ranks, against the one-rank layer.

- SSMB with capacity dropping: each TP rank decides capacity over its own 1/tp slice, so
  the ground truth is the reference layer run on every slice separately (outputs, input
  gradients, summed router/shared gradients, expert gradients).
- Plain TP routes the full sequence on every rank: exactly the one-rank layer, dropping
  included.
- The balance losses are shares: summed over TP they equal the full-sequence losses.
- X-MoE's form with a replicated input (slice at entry, all-gather at exit) gives the
  full-sequence output on every rank and the replicated input gradient.
"""

import torch
import torch.distributed as dist
from ep_spawn import run_ranks

from xmoe.config import load_config
from xmoe.moe.layer import MoELayer
from xmoe.moe.ssmb import TPRouter, run_moe_block
from xmoe.parallel.groups import create_parallel_state
from xmoe.parallel.tensor_parallel import TPGroup

D, E = 16, 8
BASE = [f"model.hidden={D}", "moe.expert_hidden=8", f"moe.num_experts={E}", "moe.top_k=3"]
TOL = dict(rtol=2e-5, atol=1e-7)


def _layers(overrides, state, seed=3):
    """The one-rank reference layer and this rank's TP layer (dispatcher, ssmb in overrides)."""
    torch.manual_seed(seed)
    shared = [o for o in overrides if not o.startswith(("parallel.", "moe.dispatcher"))]
    ref = MoELayer(load_config("tiny", [*BASE, *shared])).double()
    cfg = load_config(
        "tiny", [*BASE, *overrides, f"parallel.tp={state.tp}", f"parallel.ep={state.ep}"]
    )
    torch.manual_seed(seed)
    layer = MoELayer(cfg, state).double()
    return ref, layer


def _grads(layer, state):
    """Gradients reduced as the engine does with DP = 1: experts over expert-DP; the rest
    were summed over TP by the model's hooks (done here by hand for a bare layer)."""
    out = {}
    for name, p in layer.named_parameters():
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        expert = getattr(p, "allreduce", True) is False
        dist.all_reduce(g, group=state.expert_dp_group if expert else state.tp_group)
        out[name] = g
    return out


def _compare_params(layer, ref, state, tag):
    grads = _grads(layer, state)
    ref_params = dict(ref.named_parameters())
    El = E // state.ep
    lo = state.ep_rank * El
    for name, g in grads.items():
        want = ref_params[name].grad
        if name.startswith("experts."):
            want = want[lo : lo + El]
        torch.testing.assert_close(g, want, **TOL, msg=f"{tag} {name}")


def _ssmb_dropping(rank, world, state, dispatcher, T):
    overrides = ["moe.capacity_factor=0.6", f"moe.dispatcher={dispatcher}"]
    ref, layer = _layers(overrides, state)
    g = torch.Generator().manual_seed(21)
    x_TD = torch.randn(T, D, generator=g, dtype=torch.float64)
    gy_TD = torch.randn(T, D, generator=g, dtype=torch.float64)
    tp = TPGroup(state.tp, state.tp_rank, state.tp_group)
    rows = tp.rows(T)
    tag = f"ssmb dropping {dispatcher} rank {rank}/{world}"

    xr = x_TD.clone().requires_grad_()
    slices = [ref(part) for part in xr.chunk(state.tp)]  # capacity per slice
    sum((y * gy).sum() for y, gy in zip(slices, gy_TD.chunk(state.tp))).backward()
    dropped_ref = ref.last_stats["dropped_fraction"]

    x = x_TD[rows].clone().requires_grad_()
    y = layer(x)  # the slice in, the slice out: no communication around the block
    (y * gy_TD[rows]).sum().backward()
    torch.testing.assert_close(y, slices[state.tp_rank], **TOL, msg=tag)
    torch.testing.assert_close(x.grad, xr.grad[rows], **TOL, msg=tag)
    _compare_params(layer, ref, state, tag)
    if state.tp_rank == state.tp - 1:
        assert layer.last_stats["dropped_fraction"] == dropped_ref > 0, tag


def _plain_tp_dropping(rank, world, state, dispatcher, T):
    overrides = ["moe.capacity_factor=0.6", "parallel.ssmb=false", f"moe.dispatcher={dispatcher}"]
    ref, layer = _layers(overrides, state)
    g = torch.Generator().manual_seed(22)
    x_TD = torch.randn(T, D, generator=g, dtype=torch.float64)
    gy_TD = torch.randn(T, D, generator=g, dtype=torch.float64)
    rows = TPGroup(state.tp, state.tp_rank, state.tp_group).rows(T)
    tag = f"plain TP dropping {dispatcher} rank {rank}/{world}"

    xr = x_TD.clone().requires_grad_()
    y_ref = ref(xr)
    (y_ref * gy_TD).sum().backward()

    x = x_TD[rows].clone().requires_grad_()
    y = layer(x)
    (y * gy_TD[rows]).sum().backward()
    torch.testing.assert_close(y, y_ref[rows], **TOL, msg=tag)
    torch.testing.assert_close(x.grad, xr.grad[rows], **TOL, msg=tag)
    assert layer.last_stats["dropped_fraction"] == ref.last_stats["dropped_fraction"] > 0
    _compare_params(layer, ref, state, tag)


def _loss_shares(rank, world, state, T):
    for ssmb in ("true", "false"):
        ref, layer = _layers([f"parallel.ssmb={ssmb}", "moe.capacity_factor=0.6"], state)
        g = torch.Generator().manual_seed(23)
        x_TD = torch.randn(T, D, generator=g, dtype=torch.float64)
        rows = TPGroup(state.tp, state.tp_rank, state.tp_group).rows(T)
        xr = x_TD.clone().requires_grad_()
        ref(xr)
        (ref.last_aux_loss + 0.5 * ref.last_z_loss).backward()

        x = x_TD[rows].clone().requires_grad_()
        layer(x)
        share = torch.stack([layer.last_aux_loss, layer.last_z_loss])
        (share[0] + 0.5 * share[1]).backward()
        total = share.detach().clone()
        dist.all_reduce(total, group=state.tp_group)
        tag = f"loss shares ssmb={ssmb} rank {rank}/{world}"
        want = torch.stack([ref.last_aux_loss, ref.last_z_loss]).detach().float()
        torch.testing.assert_close(total, want, **TOL, msg=tag)
        torch.testing.assert_close(x.grad, xr.grad[rows], **TOL, msg=tag)
        grad_W = layer.router.weight_ED.grad.clone()
        dist.all_reduce(grad_W, group=state.tp_group)
        torch.testing.assert_close(grad_W, ref.router.weight_ED.grad, **TOL, msg=tag)


def _replicated_input(rank, world, state, T):
    ref, layer = _layers([], state)
    g = torch.Generator().manual_seed(24)
    x_TD = torch.randn(T, D, generator=g, dtype=torch.float64)
    gy_TD = torch.randn(T, D, generator=g, dtype=torch.float64)
    tp = TPGroup(state.tp, state.tp_rank, state.tp_group)
    xr = x_TD.clone().requires_grad_()
    (ref(xr) * gy_TD).sum().backward()

    x = x_TD.clone().requires_grad_()  # every TP rank holds the whole sequence
    y = run_moe_block(layer._forward_tokens, x, tp, ssmb=True, input_sharded=False)
    (y * gy_TD).sum().backward()
    tag = f"replicated input rank {rank}/{world}"
    torch.testing.assert_close(y, ref(x_TD).detach(), **TOL, msg=tag)
    torch.testing.assert_close(x.grad, xr.grad, **TOL, msg=tag)
    _compare_params(layer, ref, state, tag)


def _run(rank, world):
    for ep, dispatcher in ((1, "reference"), (world, "pft")):
        cfg = load_config("tiny", [*BASE, f"parallel.tp={world}", f"parallel.ep={ep}"])
        state = create_parallel_state(cfg, rank, world)
        assert isinstance(_layers([f"moe.dispatcher={dispatcher}"], state)[1].router, TPRouter)
        _ssmb_dropping(rank, world, state, dispatcher, T=12)
        _plain_tp_dropping(rank, world, state, dispatcher, T=12)
        if ep == 1:
            _loss_shares(rank, world, state, T=10)
            _replicated_input(rank, world, state, T=10)


def test_ssmb_block_on_two_ranks():
    run_ranks(2, _run)
