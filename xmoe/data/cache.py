"""Build-once, read-everywhere cache directories for sample indices.

Rank 0 builds the directory under a temporary name and renames it into place, so it appears
complete or not at all; a file lock keeps two builders on one host from duplicating work.
Every other rank waits for the directory to appear. No collective is involved, so this
works before (or without) torch.distributed, and on shared filesystems.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from xmoe.data.errors import DataError

_DONE = "meta.json"


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xmoe"


def wait_timeout_s() -> float:
    return float(os.environ.get("XMOE_DATA_WAIT_S", "1800"))


def ensure_built(target: Path, build: Callable[[Path], None], rank: int) -> Path:
    """Return `target`, building it with `build(tmp_dir)` on rank 0 if it is missing.

    `build` must write `meta.json` into the directory it is given (last, by convention).
    """
    if (target / _DONE).is_file():
        return target
    if rank != 0:
        return _wait_for(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (target / _DONE).is_file():
                return target
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            try:
                build(tmp)
                if not (tmp / _DONE).is_file():
                    raise RuntimeError(f"cache builder for {target} wrote no {_DONE}")
                os.rename(tmp, target)
            except OSError:
                # Another host's rank 0 renamed its copy first: theirs is identical.
                if not (target / _DONE).is_file():
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _wait_for(target: Path) -> Path:
    deadline = time.monotonic() + wait_timeout_s()
    delay = 0.01
    while not (target / _DONE).is_file():
        if time.monotonic() > deadline:
            raise DataError(
                f"{target}: timed out after {wait_timeout_s():.0f}s waiting for rank 0 to build "
                "this sample index (is rank 0 reading the same data? XMOE_DATA_WAIT_S sets the wait)"
            )
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    return target


def writable_dir(preferred: Path, fallback: Path) -> Path:
    """`preferred` when this process may create files there, else `fallback`."""
    probe = preferred
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return preferred if os.access(probe, os.W_OK) else fallback
