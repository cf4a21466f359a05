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

Process groups: with EP > 1 the layer takes our EP and expert-DP groups
(`xmoe.parallel.groups`) when it is built, registered under DeepSpeed's name
`ep_size_{ep}`, so DeepSpeed creates none of its own and the layer runs with or without
DeepSpeed's engine. The engine's own `set_deepspeed_parallelism` call then only checks that
DeepSpeed still holds those groups.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from xmoe.config import Config, ConfigError
from xmoe.moe.dispatch import Dispatched, Dispatcher, Routing
from xmoe.moe.experts import DenseMLP


def _check_groups(name: str, ep_group: Any, ranks: dict[str, list[int]]) -> None:
    """Refuse DeepSpeed groups whose ranks differ from our layout (see `_bound_moe_class`)."""
    import torch.distributed as dist
    from deepspeed.utils import groups as ds_groups

    held = (
        ("this layer's ep", ep_group, ranks["ep"]),
        ("registered ep", ds_groups._get_expert_parallel_group_dict().get(name), ranks["ep"]),
        (
            "registered expert_dp",
            ds_groups._get_expert_data_parallel_group_dict().get(name),
            ranks["expert_dp"],
        ),
    )
    for what, group, ours in held:
        got = None if group is None else dist.get_process_group_ranks(group)
        if got != ours:
            raise RuntimeError(
                f"DeepSpeed's {what} group {name} holds ranks {got} but our layout has {ours}: "
                "register our groups (xmoe.parallel.groups.register_with_deepspeed) "
                "before DeepSpeed builds its own"
            )


@functools.cache
def _bound_moe_class() -> type:
    """DeepSpeed's `MoE`, taking our expert-parallel groups once when it is built.

    DeepSpeed's engine calls `set_deepspeed_parallelism` on every MoE module it wraps, and
    its gate accepts an EP group only once. Binding our groups at construction (so the layer
    also runs without an engine) turns that later call into a check: the group the layer
    exchanges tokens over, and the expert-DP group the engine reduces expert gradients
    over, are still the ones `xmoe.parallel.groups` laid out.
    """
    try:
        import deepspeed
    except ImportError:
        raise ConfigError(
            "moe.dispatcher=deepspeed needs the deepspeed package: pip install deepspeed"
        ) from None
    # a CPU run would otherwise JIT-build a shared-memory comm op for minutes
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from deepspeed.moe.layer import MoE

    class BoundMoE(MoE):
        """DeepSpeed's MoE layer whose EP / expert-DP groups are ours (`bind_groups`)."""

        bound_ranks: dict[str, list[int]] | None = None

        def bind_groups(self, state: Any) -> None:
            """Hand DeepSpeed our groups under its name and take them, once, at build time."""
            import torch.distributed as dist

            from xmoe.parallel.groups import register_with_deepspeed

            # DeepSpeed's collectives go through its own comm layer, set up on top of ours
            deepspeed.init_distributed(dist_backend=dist.get_backend())
            # DeepSpeed finds our groups under its name `ep_size_{ep}` and builds none
            register_with_deepspeed(state)
            self.bound_ranks = {k: list(state.ranks[k]) for k in ("ep", "expert_dp")}
            super().set_deepspeed_parallelism()
            _check_groups(self.expert_group_name, self.deepspeed_moe.ep_group, self.bound_ranks)

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            """DeepSpeed's setup when no groups are bound (EP = 1), else the check above."""
            if self.bound_ranks is None:
                super().set_deepspeed_parallelism(use_data_before_expert_parallel_)
                return
            if use_data_before_expert_parallel_:
                raise RuntimeError(
                    "DeepSpeed's use_data_before_expert_parallel lays out expert groups "
                    "unlike parallel.ep (EP blocks of consecutive ranks): leave it off"
                )
            _check_groups(self.expert_group_name, self.deepspeed_moe.ep_group, self.bound_ranks)

    return BoundMoE


class DeepSpeedDispatcher(Dispatcher):
    """Wraps `deepspeed.moe.layer.MoE`; use through `MoELayer` (it owns routing)."""

    owns_routing = True

    def __init__(self, cfg: Config, parallel_state: Any = None) -> None:
        super().__init__()
        MoE = _bound_moe_class()
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
            self.moe.bind_groups(parallel_state)
        self.ep = ep

    def forward_routed(
        self, x_TD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """out_TD, aux loss, z loss (zero: DeepSpeed has none) and the layer's statistics."""
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

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, meanwhile=None) -> Dispatched:
        raise RuntimeError("DeepSpeedDispatcher owns routing: call forward_routed (MoELayer does)")

    def combine(self, y_RD: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
        raise RuntimeError("DeepSpeedDispatcher owns routing: call forward_routed (MoELayer does)")
