"""Checkpoints: DeepSpeed's model/optimizer/scheduler state plus what exact resumption needs.

Layout under `<run_dir>/checkpoints/`: one DeepSpeed tag directory per save (`step0000010`)
and DeepSpeed's `latest` file. Beside DeepSpeed's files each tag holds:
- `config.yaml`: the resolved config of the run;
- `rank{r}.pt` for every rank: step, the data position and the RNG states (torch, CUDA,
  python, numpy) so the losses after a resume equal an uninterrupted run bit for bit;
- `experts_ep{i}.pt`: the routed experts of EP index i (written by expert-DP rank 0),
  because DeepSpeed's model file comes from one rank and holds only that rank's experts.
Only the last `keep_last` tags are kept.

Integrity: a save is written under `checkpoints/.partial/<tag>`, checksummed into
`manifest.json` (step, layout, every file's size and sha256, hashed by all ranks in
parallel and fsynced) and only then renamed into place, so a tag directory is either
complete or absent. At resume the newest tag whose manifest checks out is used; a
partial or corrupt one is reported in one line and the one before it is tried.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from xmoe.config import ConfigError

TAG_PREFIX = "step"
MANIFEST = "manifest.json"
STAGING = ".partial"  # saves in progress; never read at resume


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
    """Save everything needed to continue at `step` (all ranks call this); atomic per tag."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    staging = ckpt_dir / STAGING
    if pstate.rank == 0:
        shutil.rmtree(staging / tag, ignore_errors=True)  # left by an interrupted save
        staging.mkdir(parents=True, exist_ok=True)
    _barrier()
    engine.save_checkpoint(str(staging), tag=tag, client_state={"step": step}, save_latest=False)
    tag_dir = staging / tag
    extra = {"step": step, "data": data_state, "rng": _rng_state()}
    torch.save(extra, tag_dir / f"rank{pstate.rank}.pt")
    if pstate.expert_dp_rank == 0:
        torch.save(_expert_state(engine.module), tag_dir / f"experts_ep{pstate.ep_rank}.pt")
    if pstate.rank == 0:
        (tag_dir / "config.yaml").write_text(cfg_yaml)
    _barrier()
    files = _checksum_share(tag_dir, pstate)
    if pstate.rank == 0:
        layout = {"world": pstate.world, "tp": pstate.tp, "ep": pstate.ep, "dp": pstate.dp}
        _write_atomic(
            tag_dir / MANIFEST,
            json.dumps({"step": step, "tag": tag, **layout, "files": files}, indent=1),
        )
        _fsync_dir(tag_dir)
        final = ckpt_dir / tag
        if final.exists():  # the same step saved again (a run started over with --force)
            old = staging / f"{tag}.replaced"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tag_dir, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tag_dir, final)
        _write_atomic(ckpt_dir / "latest", tag)  # DeepSpeed's pointer, for its own tools
        _fsync_dir(ckpt_dir)
        shutil.rmtree(staging, ignore_errors=True)
        for old_tag in list_tags(ckpt_dir)[:-keep_last]:
            shutil.rmtree(ckpt_dir / old_tag, ignore_errors=True)
    _barrier()
    return ckpt_dir / tag


def list_tags(ckpt_dir: Path) -> list[str]:
    """Completed (renamed into place) checkpoint tags, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(
        p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX)
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
        os.fsync(f.fileno())  # what was hashed is what is on disk, not only in the page cache
    return h.hexdigest()


def _files_of(tag_dir: Path) -> list[str]:
    return sorted(
        str(p.relative_to(tag_dir))
        for p in tag_dir.rglob("*")
        if p.is_file() and p.name != MANIFEST
    )


def _gather(obj: Any) -> list[Any]:
    if dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _checksum_share(tag_dir: Path, pstate: Any) -> dict[str, dict[str, Any]]:
    """{file: {size, sha256}} of the whole tag; each rank hashes every world-th file."""
    names = _files_of(tag_dir)
    mine = {
        name: {"size": (tag_dir / name).stat().st_size, "sha256": _sha256(tag_dir / name)}
        for i, name in enumerate(names)
        if i % pstate.world == pstate.rank
    }
    merged: dict[str, dict[str, Any]] = {}
    for part in _gather(mine):
        merged.update(part)
    return dict(sorted(merged.items()))


def _problem(tag_dir: Path, pstate: Any) -> str | None:
    """Why this rank cannot trust `tag_dir` (its share of the hashes), or None."""
    try:
        manifest = json.loads((tag_dir / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest.json: the save did not finish"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest.json ({e})"
    if manifest.get("tag") != tag_dir.name:
        return f"manifest.json names tag {manifest.get('tag')!r}"
    for i, (name, meta) in enumerate(sorted(files.items())):
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {meta['size']}"
        if i % pstate.world == pstate.rank and _sha256(path) != meta["sha256"]:
            return f"{name} does not match its sha256"
    return None


def find_valid_checkpoint(ckpt_dir: Path, pstate: Any) -> str | None:
    """The newest tag every rank agrees is complete and intact; reports each one passed over."""
    for tag in reversed(list_tags(ckpt_dir)):
        problems = [p for p in _gather(_problem(Path(ckpt_dir) / tag, pstate)) if p]
        if not problems:
            return tag
        if pstate.rank == 0:
            print(
                f"xmoe: checkpoint {Path(ckpt_dir) / tag} is unusable ({problems[0]}); "
                "trying the one before it",
                file=sys.stderr,
                flush=True,
            )
    return None


def _check_layout(tag_dir: Path, pstate: Any) -> None:
    manifest = json.loads((tag_dir / MANIFEST).read_text())
    saved = {k: manifest.get(k) for k in ("world", "tp", "ep", "dp")}
    now = {"world": pstate.world, "tp": pstate.tp, "ep": pstate.ep, "dp": pstate.dp}
    if saved != now:
        raise ConfigError(
            f"checkpoint {tag_dir} was written with {saved}, this run has {now}: "
            "resume with the same ranks and parallel layout"
        )


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = Path(ckpt_dir) / "latest"
    if latest.is_file():
        return latest.read_text().strip()
    return None


def load_checkpoint(
    engine: Any, ckpt_dir: Path, pstate: Any, tag: str | None = None
) -> tuple[int, dict]:
    """Restore `tag` (default: the newest valid one); returns (step, data state).

    RNG is restored last.
    """
    if tag is None:
        tag = find_valid_checkpoint(ckpt_dir, pstate)
    if not tag:
        raise ConfigError(
            f"no usable checkpoint in {ckpt_dir} (each is partial or corrupt, see above): "
            "start over with --force or point --run-dir elsewhere"
        )
    tag_dir = Path(ckpt_dir) / tag
    _check_layout(tag_dir, pstate)
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise FileNotFoundError(f"checkpoint {tag_dir} could not be loaded")
    experts = torch.load(tag_dir / f"experts_ep{pstate.ep_rank}.pt", map_location="cpu")
    params = dict(engine.module.named_parameters())
    with torch.no_grad():
        for name, value in experts.items():
            params[name].copy_(value)
    extra = torch.load(tag_dir / f"rank{pstate.rank}.pt", map_location="cpu", weights_only=False)
    _set_rng_state(extra["rng"])
    return int(extra["step"]), extra["data"]


def resume_latest(engine: Any, ckpt_dir: Path, pstate: Any) -> tuple[int, dict, Path] | None:
    """Restore the newest valid checkpoint: (step, data state, its directory).

    None when the run has no checkpoint yet (a first attempt that ended before saving);
    ConfigError when it has some but none is usable.
    """
    if not list_tags(ckpt_dir):
        return None
    tag = find_valid_checkpoint(ckpt_dir, pstate)
    step, data_state = load_checkpoint(engine, ckpt_dir, pstate, tag or "")
    return step, data_state, Path(ckpt_dir) / tag
