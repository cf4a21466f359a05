"""DeepSpeed's own MoE layer (`deepspeed.moe.layer.MoE`) behind our MoE-layer interface.

The peer every benchmark runs side by side. DeepSpeed's layer owns its gate (top-k with
capacity factor and `drop_tokens`) and its experts (one copy of an expert module per local
expert), so it replaces the whole routed part of `MoELayer` — router, dispatch, experts
and combine — rather than only the dispatch. `MoELayer` asks for that with
`owns_routing` and calls `forward_routed` instead; shared experts stay ours.

Mapping of our config: `capacity_factor` -> DeepSpeed's capacity factor with
`drop_tokens=True` (its capacity is ceil(T * k * cf / E), like ours; min_capacity 0);
dropless -> `drop_tokens=False` (DeepSpeed then pads every expert to the largest count).
Random token selection and second-expert sampling are off so runs are deterministic.
DeepSpeed's gate has no z-loss and always renormalises the top-k weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from xmoe.config import Config, ConfigError
from xmoe.moe.dispatch import Dispatched, Dispatcher, Routing
from xmoe.moe.experts import DenseMLP


def _import_deepspeed_moe():
    try:
        import deepspeed
    except ImportError:
        raise ConfigError(
            "moe.dispatcher=deepspeed needs the deepspeed package: pip install deepspeed"
        ) from None
    # a CPU run would otherwise JIT-build a shared-memory comm op for minutes
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from deepspeed.moe.layer import MoE

    return MoE


class DeepSpeedDispatcher(Dispatcher):
    """Wraps `deepspeed.moe.layer.MoE`; use through `MoELayer` (it owns routing)."""

    owns_routing = True

    def __init__(self, cfg: Config, parallel_state: Any = None) -> None:
        super().__init__()
        MoE = _import_deepspeed_moe()
        m, e = cfg.model, cfg.moe
        self.top_k = e.top_k
        self.num_experts = e.num_experts
        self.capacity_factor = e.capacity_factor
        ep = 1 if parallel_state is None else parallel_state.ep
        expert = DenseMLP(m.hidden, e.expert_hidden, e.activation, m.init_std)
        self.moe = MoE(
            m.hidden,
            expert,
            num_experts=e.num_experts,
            ep_size=ep,
            k=e.top_k,
            capacity_factor=e.capacity_factor or 1.0,
            eval_capacity_factor=e.capacity_factor or 1.0,
            min_capacity=0,
            drop_tokens=not e.dropless,
            use_rts=False,
            top2_2nd_expert_sampling=False,
        )
        if ep > 1:
            import deepspeed
            import torch.distributed as dist

            from xmoe.parallel.groups import register_with_deepspeed

            # DeepSpeed's collectives go through its own comm layer, set up on top of ours
            deepspeed.init_distributed(dist_backend=dist.get_backend())

            # DeepSpeed finds our EP / expert-DP groups under its name and builds none of its own
            register_with_deepspeed(parallel_state)
        self.ep = ep

    def forward_routed(
        self, x_TD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """out_TD, aux loss, z loss (zero: DeepSpeed has none) and the layer's statistics."""
        if self.ep > 1 and self.moe.deepspeed_moe.ep_group is None:
            # DeepSpeed's engine does this when it wraps the model; without an engine
            # (benchmarks, tests) the first forward does. It may happen only once.
            self.moe.set_deepspeed_parallelism()
        out_TD, aux, counts_E = self.moe(x_TD)
        T = x_TD.shape[0]
        dropped = 0.0
        if self.capacity_factor and T:
            cap = math.ceil(T * self.top_k * self.capacity_factor / self.num_experts)
            over = (counts_E - cap).clamp_min(0).sum().item()
            dropped = over / (T * self.top_k)
        stats = {
            "tokens_per_expert": counts_E.detach(),
            "dropped_fraction": dropped,
            "dispatcher": {"rows": float(T * self.top_k) * (1 - dropped)},
        }
        return out_TD, aux.float(), aux.new_zeros((), dtype=torch.float32), stats

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> Dispatched:
        raise RuntimeError("DeepSpeedDispatcher owns routing: call forward_routed (MoELayer does)")

    def combine(self, y_RD: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        raise RuntimeError("DeepSpeedDispatcher owns routing: call forward_routed (MoELayer does)")
