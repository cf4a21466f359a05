"""Checkpoints: DeepSpeed's model/optimizer/scheduler state plus what exact resumption needs.

Layout under `<run_dir>/checkpoints/`: one DeepSpeed tag directory per save (`step0000010`)
and DeepSpeed's `latest` file. Beside DeepSpeed's files each tag holds:
- `config.yaml`: the resolved config of the run;
- `rank{r}.pt` for every rank: step, the data position and the RNG states (torch, CUDA,
  python, numpy) so the losses after a resume equal an uninterrupted run bit for bit;
- `experts_ep{i}.pt`: the routed experts of EP index i (written by expert-DP rank 0),
  because DeepSpeed's model file comes from one rank and holds only that rank's experts.
Only the last `keep_last` tags are kept.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

TAG_PREFIX = "step"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:07d}"


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _expert_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: p.detach().cpu().clone()
        for name, p in model.named_parameters()
        if getattr(p, "allreduce", True) is False
    }


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    engine: Any,
    ckpt_dir: Path,
    step: int,
    cfg_yaml: str,
    data_state: dict,
    pstate: Any,
    keep_last: int,
) -> Path:
    """Save everything needed to continue at `step` (all ranks call this)."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step})
    tag_dir = ckpt_dir / tag
    extra = {"step": step, "data": data_state, "rng": _rng_state()}
    torch.save(extra, tag_dir / f"rank{pstate.rank}.pt")
    if pstate.expert_dp_rank == 0:
        torch.save(_expert_state(engine.module), tag_dir / f"experts_ep{pstate.ep_rank}.pt")
    if pstate.rank == 0:
        (tag_dir / "config.yaml").write_text(cfg_yaml)
    _barrier()
    if pstate.rank == 0:
        tags = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX))
        for old in tags[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return tag_dir


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = Path(ckpt_dir) / "latest"
    if latest.is_file():
        return latest.read_text().strip()
    return None


def load_checkpoint(engine: Any, ckpt_dir: Path, pstate: Any) -> tuple[int, dict]:
    """Restore the latest checkpoint; returns (step, data state). RNG is restored last."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (its 'latest' file is missing)")
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise FileNotFoundError(f"checkpoint {ckpt_dir / tag} could not be loaded")
    tag_dir = Path(ckpt_dir) / tag
    experts = torch.load(tag_dir / f"experts_ep{pstate.ep_rank}.pt", map_location="cpu")
    params = dict(engine.module.named_parameters())
    with torch.no_grad():
        for name, value in experts.items():
            params[name].copy_(value)
    extra = torch.load(tag_dir / f"rank{pstate.rank}.pt", map_location="cpu", weights_only=False)
    _set_rng_state(extra["rng"])
    return int(extra["step"]), extra["data"]
