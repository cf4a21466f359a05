"""Routing cases shared by the kernel tests: ragged, empty and degenerate assignments."""

from __future__ import annotations

import torch

# (name, tokens, top_k, experts)
CASES = [
    ("ragged", 37, 2, 8),
    ("top_k_equals_experts", 9, 4, 4),
    ("single_token", 1, 3, 8),
    ("no_tokens", 0, 2, 4),
    ("one_expert_gets_all", 23, 1, 6),
    ("many_experts_few_tokens", 5, 2, 64),
]


def make_routing(tokens: int, top_k: int, experts: int, seed: int, drop: bool):
    """Distinct top-k expert ids per token; `drop` removes a random ~30% of assignments."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=g)
    if top_k == 1 and experts > 1:
        scores[:, 0] += 2.0  # every token on expert 0: the other experts get zero rows
    ids_TK = scores.topk(top_k, dim=1).indices
    keep_TK = torch.rand(tokens, top_k, generator=g) > 0.3 if drop else None
    return ids_TK, keep_TK
