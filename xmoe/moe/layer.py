"""The MoE block: router -> dispatch -> routed experts -> combine, plus shared experts.

`MoELayer` knows nothing of how rows travel between ranks; that is the dispatcher's job,
chosen once by `make_dispatcher`. Expert weights hold only this rank's E/ep experts.
After each forward the layer leaves its statistics in `last_stats` (and the unscaled
router losses in `last_aux_loss` / `last_z_loss`) for the model to sum and the loop to log.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from xmoe.config import Config, ConfigError
from xmoe.moe.dispatch import Dispatcher
from xmoe.moe.experts import DenseMLP, GroupedExperts
from xmoe.moe.reference import ReferenceDispatcher
from xmoe.moe.router import Router
from xmoe.moe.ssmb import TPRouter, run_moe_block
from xmoe.parallel.tensor_parallel import TPGroup


def _ep_size(parallel_state: Any) -> int:
    return 1 if parallel_state is None else parallel_state.ep


def make_dispatcher(cfg: Config, parallel_state: Any = None) -> Dispatcher:
    """The dispatcher named by `cfg.moe.dispatcher` (one place; no registry)."""
    name = cfg.moe.dispatcher
    if name == "reference":
        if _ep_size(parallel_state) != 1:
            raise ConfigError(
                "moe.dispatcher=reference runs only with parallel.ep=1: use pft, padded or rbd for EP > 1"
            )
        return ReferenceDispatcher(cfg.moe.num_experts)
    try:
        if name == "padded":
            from xmoe.moe.padded import PaddedDispatcher as cls
        elif name == "deepspeed":
            from xmoe.moe.deepspeed_moe import DeepSpeedDispatcher as cls
        elif name == "pft":
            from xmoe.moe.pft import PFTDispatcher as cls
        elif name == "rbd":
            from xmoe.moe.rbd import RBDDispatcher as cls
        else:
            raise ConfigError(f"moe.dispatcher={name!r} is unknown")
    except ImportError:
        raise ConfigError(
            f"moe.dispatcher={name} is not available yet: use moe.dispatcher=reference"
        ) from None
    return cls(cfg, parallel_state)


class _Once:
    """`fn(*args)`, computed on the first call; later calls give the same result."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn, self.args, self.done, self.value = fn, args, False, None

    def __call__(self) -> Any:
        if not self.done:
            self.value, self.done = self.fn(*self.args), True
        return self.value


class MoELayer(nn.Module):
    """A DeepSeek-MoE feed-forward block over the local tokens of one rank."""

    def __init__(self, cfg: Config, parallel_state: Any = None, layer_idx: int = 0) -> None:
        super().__init__()
        m, e = cfg.model, cfg.moe
        ep = _ep_size(parallel_state)
        ep_rank = 0 if parallel_state is None else parallel_state.ep_rank
        self.cfg = cfg
        self.ep = ep
        self.num_local_experts = e.num_experts // ep
        # tp > 1: the block runs inside the sequence-parallel region (xmoe.moe.ssmb)
        self.tp = TPGroup.from_state(parallel_state)
        self.ssmb = cfg.parallel.ssmb
        if self.tp is None:
            self.router = Router(e, m.hidden, init_std=m.init_std)
        else:
            self.router = TPRouter(e, m.hidden, self.tp, self.ssmb, init_std=m.init_std)
        if e.max_nodes_per_token and parallel_state is not None:
            # the EP group spans ep / ep_node_size nodes; experts are laid out node by node
            nodes = ep // parallel_state.ep_node_size
            self.router.experts_per_node = e.num_experts // nodes
            if (
                e.max_nodes_per_token < nodes
                and e.max_nodes_per_token * e.num_experts < nodes * e.top_k
            ):
                raise ConfigError(
                    f"moe.max_nodes_per_token={e.max_nodes_per_token} nodes of "
                    f"{e.num_experts // nodes} experts cannot hold moe.top_k={e.top_k} experts: "
                    f"raise max_nodes_per_token to at least {-(-e.top_k * nodes // e.num_experts)}"
                )
        self.dispatcher = make_dispatcher(cfg, parallel_state)
        self.experts = None  # DeepSpeed's MoE layer (owns_routing) brings its own experts
        if not getattr(self.dispatcher, "owns_routing", False):
            self.experts = GroupedExperts(
                self.num_local_experts,
                m.hidden,
                e.expert_hidden,
                e.activation,
                init_std=m.init_std,
                grouped_gemm=e.grouped_gemm,
                ep_size=ep,
                first_expert=ep_rank * self.num_local_experts,
                init_seed=cfg.train.seed * 1009 + layer_idx,
            )
        self.shared = None
        if e.num_shared_experts > 0:
            self.shared = DenseMLP(
                m.hidden, e.num_shared_experts * e.expert_hidden, e.activation, m.init_std
            )
        self.last_stats: dict[str, Any] = {}
        self.last_aux_loss: torch.Tensor | None = None
        self.last_z_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp is not None:
            # x is this TP rank's rows of the sequence: SSMB routes them as they are,
            # plain TP gathers the full sequence first
            return run_moe_block(self._forward_tokens, x, self.tp, self.ssmb)
        return self._forward_tokens(x)

    def _forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        shared = None if self.shared is None else _Once(self.shared, x_TD)
        if getattr(self.dispatcher, "owns_routing", False):
            # DeepSpeed's MoE layer brings its own gate and experts (xmoe.moe.deepspeed_moe)
            out_TD, aux, z, stats = self.dispatcher.forward_routed(x_TD)
            self.last_aux_loss, self.last_z_loss, self.last_stats = aux, z, stats
        else:
            r = self.router(x_TD)
            # the dispatch queues the shared experts just before it waits for the host, so
            # the GPU runs them while the host blocks and then issues the exchange
            dispatched = self.dispatcher.dispatch(x_TD, r.routing, meanwhile=shared)
            y_RD = self.dispatcher.run_experts(self.experts, dispatched)
            out_TD = self.dispatcher.combine(y_RD, dispatched)
            self.last_aux_loss, self.last_z_loss = r.aux_loss, r.z_loss
            self.last_stats = {
                "tokens_per_expert": r.tokens_per_expert_E.detach(),
                "dropped_fraction": r.dropped_fraction,
                "dispatcher": dict(dispatched.stats),
            }
        if shared is not None:
            out_TD = out_TD + shared()
        return out_TD.reshape(shape)
