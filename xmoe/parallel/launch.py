"""One call from a fresh process to a ready parallel layout: `setup_parallel(cfg)`."""

from __future__ import annotations

from xmoe.config import Config, validate_layout
from xmoe.parallel.groups import ParallelState, create_parallel_state
from xmoe.parallel.topology import Launch, detect_launch, init_distributed


def setup_parallel(cfg: Config, launch: Launch | None = None) -> ParallelState:
    """Check the layout against the launch, initialise torch.distributed, build the groups.

    The layout check runs before anything is initialised, so a bad EP/TP/batch setting
    fails with a ConfigError on every rank at once.
    """
    launch = launch or detect_launch()
    validate_layout(cfg, launch.world)
    launch, device = init_distributed(launch, timeout_s=cfg.train.collective_timeout_s)
    return create_parallel_state(
        cfg, launch.rank, launch.world, launch.local_rank, launch.local_world, device
    )
