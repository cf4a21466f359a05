"""Expert initialisation: per-expert streams, the same values with any thread count or EP split."""

import pytest
import torch

import xmoe.moe.experts as experts_mod
from xmoe.moe.experts import GroupedExperts


def _reference(num_experts, D, F_, seed, std, first=0, swiglu=True):
    """Expert e's weights: its own generator, seeded by its global id, w1 then w3 then w2."""
    ws = []
    for e in range(first, first + num_experts):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + e)
        w1 = torch.randn(F_, D, generator=gen) * std
        w3 = torch.randn(F_, D, generator=gen) * std if swiglu else None
        w2 = torch.randn(D, F_, generator=gen) * std
        ws.append((w1, w3, w2))
    return ws


@pytest.mark.parametrize("threads", [1, 3, 8])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_init_matches_per_expert_streams_with_any_thread_count(threads, activation, monkeypatch):
    monkeypatch.setattr(experts_mod, "_init_threads", lambda: threads)
    ex = GroupedExperts(6, 24, 40, activation, init_std=0.05, first_expert=2, init_seed=11)
    ref = _reference(6, 24, 40, 11, 0.05, first=2, swiglu=activation == "swiglu")
    for i, (w1, w3, w2) in enumerate(ref):
        assert torch.equal(ex.w1_EFD[i], w1)
        assert torch.equal(ex.w2_EDF[i], w2)
        assert (ex.w3_EFD is None) == (w3 is None)
        if w3 is not None:
            assert torch.equal(ex.w3_EFD[i], w3)
    assert ex.w1_EFD.requires_grad and ex.w1_EFD.grad_fn is None


def test_ep_ranks_together_hold_the_one_rank_experts(monkeypatch):
    monkeypatch.setattr(experts_mod, "_init_threads", lambda: 4)
    full = GroupedExperts(8, 16, 12, init_seed=3)
    parts = [
        GroupedExperts(2, 16, 12, first_expert=2 * r, init_seed=3, ep_size=4) for r in range(4)
    ]
    for name in ("w1_EFD", "w3_EFD", "w2_EDF"):
        joined = torch.cat([getattr(p, name) for p in parts])
        assert torch.equal(getattr(full, name), joined), name
    # a different seed gives different experts
    assert not torch.equal(GroupedExperts(8, 16, 12, init_seed=4).w1_EFD, full.w1_EFD)
