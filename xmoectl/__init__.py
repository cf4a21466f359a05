"""xmoectl: build a site's environment, render and submit xmoe runs, follow them.

The CLI is a thin click layer (`xmoectl.cli`) over plain functions in `sites`, `render`,
`runs`, `slurm` and `envbuild`. Nothing here imports torch, DeepSpeed or Triton: the trainer
is started as a process, so the commands answer quickly on a login node.
"""

from __future__ import annotations

from pathlib import Path


class UserError(ValueError):
    """Bad input a user can fix; the message is one line naming the input and the fix."""


def resource_dir(name: str) -> Path:
    """Folder of bundled data (`templates`, `site_profiles`, `env`).

    An installed wheel carries them in `xmoectl/_bundled/` (copied there by the build hook in
    setup.py); a source checkout reads them from the repository's top level.
    """
    here = Path(__file__).resolve().parent
    bundled = here / "_bundled" / name
    if bundled.is_dir():
        return bundled
    return here.parent / name


def source_tree() -> Path | None:
    """The repository this xmoectl runs from, when it runs from a checkout (not a wheel)."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "xmoe" / "__init__.py").is_file():
        return root
    return None
