"""Process groups for TP, DP, EP, expert-DP and RBD's node-local / cross-node exchanges.

Rank layout (world = TP x DP):
- TP is innermost: the TP group of rank r is the `tp` consecutive ranks around it, so
  tensor-parallel traffic stays on one node (a `tp` not dividing the ranks per node is
  refused).
- DP groups are the ranks with the same TP index (stride `tp`); dense gradients reduce there.
- EP spans TP x DP ranks: blocks of `ep` consecutive ranks. With sequence-sharded MoE
  blocks every TP rank routes its own slice of the tokens, so TP ranks act as extra
  expert-parallel ranks (X-MoE's SSMB layout). The rank with index i in its EP block holds
  experts [i*E/ep, (i+1)*E/ep).
- Expert-DP groups hold the same experts: ranks with the same index in every EP block
  (stride `ep`); expert gradients reduce there only.
- Node-local groups: the part of an EP group on one node (`node_size` consecutive ranks).
  Cross-node groups: inside an EP group, the ranks with the same position on their node.
`build_groups` computes the rank lists (pure Python); `create_parallel_state` makes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from xmoe.config import Config, ConfigError


def build_groups(world: int, tp: int, ep: int, node_size: int) -> dict[str, list[list[int]]]:
    """Rank lists of every group kind: tp, dp, ep, expert_dp, node_local, cross_node."""
    if world % tp or world % ep or (node_size and world % node_size):
        raise ConfigError(
            f"tp={tp}, ep={ep} and node_size={node_size} must each divide the world size {world}"
        )
    node_size = node_size or world
    if node_size % tp:
        raise ConfigError(
            f"tp={tp} does not divide the {node_size} ranks per node: a tensor-parallel group "
            "must stay inside one node; choose tp dividing the ranks per node"
        )
    ranks = list(range(world))
    tp_groups = [ranks[i : i + tp] for i in range(0, world, tp)]
    dp_groups = [ranks[i::tp] for i in range(tp)]
    ep_groups = [ranks[i : i + ep] for i in range(0, world, ep)]
    expert_dp = [ranks[i::ep] for i in range(ep)]
    node_local: list[list[int]] = []
    cross_node: list[list[int]] = []
    for group in ep_groups:
        by_node: dict[int, list[int]] = {}
        for r in group:
            by_node.setdefault(r // node_size, []).append(r)
        chunks = list(by_node.values())
        node_local.extend(chunks)
        width = max(len(c) for c in chunks)
        for j in range(width):
            cross_node.append([c[j] for c in chunks if j < len(c)])
    return {
        "tp": tp_groups,
        "dp": dp_groups,
        "ep": ep_groups,
        "expert_dp": expert_dp,
        "node_local": node_local,
        "cross_node": cross_node,
    }


def _find(groups: list[list[int]], rank: int) -> list[int]:
    return next(g for g in groups if rank in g)


@dataclass
class ParallelState:
    """Everything a layer or the loop needs to know about the parallel layout of this rank."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: Any = "cpu"
    node_size: int = 1  # ranks per node (virtual nodes when set by cfg.parallel.node_size)
    tp: int = 1
    ep: int = 1
    ranks: dict[str, list[int]] = field(default_factory=dict)  # this rank's group of each kind
    groups: dict[str, Any] = field(
        default_factory=dict
    )  # torch ProcessGroup per kind (None = trivial)

    @property
    def node(self) -> int:
        return self.rank // self.node_size

    @property
    def dp(self) -> int:
        return self.world // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def expert_dp_rank(self) -> int:
        return self.rank // self.ep

    @property
    def tp_group(self) -> Any:
        return self.groups.get("tp")

    @property
    def dp_group(self) -> Any:
        return self.groups.get("dp")

    @property
    def ep_group(self) -> Any:
        return self.groups.get("ep")

    @property
    def expert_dp_group(self) -> Any:
        return self.groups.get("expert_dp")

    @property
    def node_local_group(self) -> Any:
        return self.groups.get("node_local")

    @property
    def cross_node_group(self) -> Any:
        return self.groups.get("cross_node")

    # names the EP dispatchers read: the EP group's part on this node and across nodes
    @property
    def ep_node_size(self) -> int:
        return len(self.ranks.get("node_local", [self.rank]))

    @property
    def ep_node_group(self) -> Any:
        return self.node_local_group

    @property
    def ep_cross_group(self) -> Any:
        return self.cross_node_group

    @property
    def expert_group_name(self) -> str:
        return f"ep_size_{self.ep}"


def create_parallel_state(
    cfg: Config,
    rank: int,
    world: int,
    local_rank: int = 0,
    local_world: int = 0,
    device: Any = "cpu",
) -> ParallelState:
    """Create every process group (all ranks call this in the same order) for this rank.

    `cfg.parallel.node_size` overrides the launcher's ranks per node (virtual nodes).
    Needs torch.distributed initialised when world > 1.
    """
    import torch.distributed as dist

    p = cfg.parallel
    node_size = p.node_size or local_world or world
    lists = build_groups(world, p.tp, p.ep, node_size)
    state = ParallelState(rank, world, local_rank, device, node_size, p.tp, p.ep)
    for kind, group_lists in lists.items():
        for ranks in group_lists:
            # new_group is collective over the world: every rank creates every group
            pg = dist.new_group(ranks) if dist.is_initialized() and world > 1 else None
            if rank in ranks:
                state.ranks[kind] = ranks
                state.groups[kind] = pg
    return state


def register_with_deepspeed(state: ParallelState) -> None:
    """Hand our EP and expert-DP groups to DeepSpeed under its name `ep_size_{ep}`.

    The engine looks these up by the `group_name` on expert parameters to reduce their
    gradients over the expert-data-parallel group only. Registering them first stops it
    from building its own (differently laid out) groups.
    """
    import torch.distributed as dist
    from deepspeed.utils import groups as ds_groups

    name = state.expert_group_name
    world_group = dist.group.WORLD
    ds_groups._EXPERT_PARALLEL_GROUP[name] = state.ep_group or world_group
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = state.ranks.get("ep", [state.rank])
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = state.expert_dp_group or world_group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = state.ranks.get("expert_dp", [state.rank])


class DeepSpeedMPU:
    """The `mpu` object DeepSpeed asks for: our TP and DP groups under its method names."""

    def __init__(self, state: ParallelState) -> None:
        import torch.distributed as dist

        self.state = state
        self._world = dist.group.WORLD

    def get_model_parallel_group(self) -> Any:
        return self.state.tp_group or self._world

    def get_model_parallel_world_size(self) -> int:
        return self.state.tp

    def get_model_parallel_rank(self) -> int:
        return self.state.tp_rank

    def get_data_parallel_group(self) -> Any:
        return self.state.dp_group or self._world

    def get_data_parallel_world_size(self) -> int:
        return self.state.dp

    def get_data_parallel_rank(self) -> int:
        return self.state.dp_rank

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank
