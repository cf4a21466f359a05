"""Tensor parallelism with SSMB on real gloo ranks equals the one-rank model.

Every rank builds the one-rank reference (TP = EP = 1, reference dispatcher) from the same
seed and runs it on every data-parallel micro-batch; the objective is their mean, as the
engine's data-parallel average makes it. The TP model runs its TP group's micro-batch; its
gradients are reduced as the engine does (dense ones over DP, experts over expert-DP,
both divided by the DP size). Then losses, logits and every gradient must match:
TP-sharded weights against their slice of the reference gradient, experts against their
rows, replicated weights (norms, embedding, head, router, shared experts) in full.
Routing is dropless here; dropping under SSMB is per slice (tests/test_ssmb.py).
"""

import pytest
import torch
import torch.distributed as dist
from ep_spawn import run_ranks

from xmoe.config import load_config
from xmoe.model import Transformer
from xmoe.parallel.groups import create_parallel_state
from xmoe.parallel.tensor_parallel import TPGroup, shard_tensor

V, S, B = 64, 8, 2
BASE = (
    f"model.vocab_size={V} model.hidden=16 model.heads=4 model.layers=3 model.ffn_hidden=24 "
    f"model.seq_len={S} moe.expert_hidden=8 moe.num_experts=8 moe.top_k=2 "
    f"moe.num_shared_experts=1 train.micro_batch={B}"
).split()
TOL = dict(rtol=2e-5, atol=1e-7)  # float64 model; the router computes in fp32


def _model(overrides, state=None):
    cfg = load_config("tiny", [*BASE, *overrides])
    torch.manual_seed(7)
    return Transformer(cfg, state).double()


def _engine_reduce(model, state):
    """The engine's reduction: experts over expert-DP, the rest over DP; mean over DP."""
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        expert = getattr(p, "allreduce", True) is False
        dist.all_reduce(g, group=state.expert_dp_group if expert else state.dp_group)
        grads[name] = g / state.dp
    return grads


def _check(rank, world, tp, ep, dispatcher, extra):
    overrides = [f"parallel.tp={tp}", f"parallel.ep={ep}", f"moe.dispatcher={dispatcher}", *extra]
    state = create_parallel_state(load_config("tiny", [*BASE, *overrides]), rank, world)
    tpg = TPGroup(tp, state.tp_rank, state.tp_group)
    tag = f"tp={tp} ep={ep} {dispatcher} {extra} rank {rank}/{world}"
    g = torch.Generator().manual_seed(11)
    batches = [torch.randint(0, V, (B, S + 1), generator=g) for _ in range(state.dp)]

    ref = _model([o for o in extra if not o.startswith("parallel.")])
    ref_losses = [ref(b[:, :-1], b[:, 1:]) for b in batches]
    torch.stack([loss for loss, _ in ref_losses]).mean().backward()
    ref_logits = ref(batches[state.dp_rank][:, :-1]).detach()

    model = _model(overrides, state)
    batch = batches[state.dp_rank]
    loss, parts = model(batch[:, :-1], batch[:, 1:])
    loss.backward()
    want_loss, want_parts = ref_losses[state.dp_rank]
    torch.testing.assert_close(loss, want_loss, **TOL, msg=tag)
    for key in ("lm_loss", "aux_loss", "z_loss"):
        torch.testing.assert_close(getattr(parts, key), getattr(want_parts, key), **TOL, msg=tag)
    with torch.no_grad():
        torch.testing.assert_close(model(batch[:, :-1]), ref_logits, **TOL, msg=tag)

    grads = _engine_reduce(model, state)
    ref_params = dict(ref.named_parameters())
    El = 8 // ep
    lo = state.ep_rank * El
    for name, p in model.named_parameters():
        want = ref_params[name].grad
        if hasattr(p, "partition_dim"):
            want = shard_tensor(want, p.partition_dim, tpg, p.partition_blocks)
        elif getattr(p, "allreduce", True) is False:
            want = want[lo : lo + El]
        assert grads[name].shape == want.shape, (tag, name)
        torch.testing.assert_close(grads[name], want, **TOL, msg=f"{tag} {name}")


CASES_2 = [
    (2, 1, "reference", []),
    (2, 1, "reference", ["parallel.ssmb=false"]),  # plain TP: MoE block on the full sequence
    (2, 2, "pft", ["train.activation_checkpointing=true"]),  # TP ranks as EP ranks
    (2, 2, "pft", ["parallel.ssmb=false"]),
    (2, 1, "padded", ["model.tie_embeddings=true", "moe.num_shared_experts=0"]),
    (2, 1, "reference", ["model.fused_lm_loss=true", "model.tie_embeddings=true"]),
]
CASES_4 = [
    (4, 1, "reference", []),
    (4, 4, "pft", ["moe.activation=gelu"]),
    (2, 2, "pft", []),  # TP=2 x EP=2, DP=2
    (2, 4, "rbd", ["parallel.node_size=2", "moe.top_k=3"]),  # EP over 2 virtual nodes
    (2, 2, "pft", ["parallel.ssmb=false"]),
]


def _run_cases(rank, world, cases):
    for tp, ep, dispatcher, extra in cases:
        _check(rank, world, tp, ep, dispatcher, extra)


@pytest.mark.timeout(120)
def test_tp2_equals_one_rank():
    run_ranks(2, _run_cases, CASES_2)


@pytest.mark.timeout(180)
def test_tp4_and_tp2_ep2_equal_one_rank():
    run_ranks(4, _run_cases, CASES_4)
