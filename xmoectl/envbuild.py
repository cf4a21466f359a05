"""`xmoectl env build` and `env check`: a site's Python environment, made and verified.

The build is a script rendered from `templates/env_build.sh.j2` (written next to the
environment as `build.sh`, so it can be read and rerun by hand): a venv or conda env, torch
and Triton pinned for the platform from its wheel index, DeepSpeed as pure Python
(`DS_BUILD_OPS=0`), xmoe itself. `activate.sh` carries the site's modules, variables and
caches, from the same block the job scripts use.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xmoectl import UserError, resource_dir, shell, source_tree
from xmoectl.render import env_paths, environment_context, local_accelerators
from xmoectl.sites import SiteProfile


@dataclass
class BuildPlan:
    """The rendered build of one site's environment."""

    prefix: Path
    platform: str
    build_script: str
    activate_script: str


def platform_of(site: SiteProfile) -> str:
    if site.python.platform != "auto":
        return site.python.platform
    return local_accelerators()[0]


def _requirements(site: SiteProfile, platform: str) -> Path:
    if site.python.requirements:
        req = Path(site.python.requirements)
        if not req.is_absolute() and site.source:
            req = Path(site.source).parent / req
    else:
        req = resource_dir("env") / f"{platform}.txt"
    if not req.is_file():
        raise UserError(
            f"site {site.name}: requirements file {req} does not exist (python.requirements)"
        )
    return req.resolve()


def plan(
    site: SiteProfile,
    prefix: str | None = None,
    *,
    torch_index: str | None = None,
    xmoe_source: str | None = None,
) -> BuildPlan:
    """Render the build and activate scripts; raises UserError on a missing input."""
    prefix = prefix or site.python.prefix
    if not prefix:
        raise UserError(f"site {site.name} names no python.prefix: give --prefix DIR")
    platform = platform_of(site)
    index = site.python.torch_index if torch_index is None else torch_index
    index_args = ["--extra-index-url", index] if index and index != "none" else []
    if xmoe_source is None:
        tree = source_tree()
        if tree is None:
            raise UserError(
                "xmoectl runs from an installed wheel: give --xmoe-source PATH_OR_WHEEL"
            )
        xmoe_source = str(tree)
    prefix_path = Path(prefix).expanduser().resolve()
    _, bindir = env_paths(site, str(prefix_path))
    build = shell.render(
        "env_build.sh.j2",
        prefix=str(prefix_path),
        modules=list(site.modules),
        cc=site.python.cc,
        cxx=site.python.cxx,
        manager=site.python.manager,
        python=site.python.python,
        index_args=index_args,
        requirements=str(_requirements(site, platform)),
        deepspeed_requirements=str((resource_dir("env") / "deepspeed.txt").resolve()),
        xmoe_source=xmoe_source,
        extra_pip=list(site.python.extra_pip),
    )
    activate = shell.render("activate.sh.j2", **environment_context(site, bindir))
    return BuildPlan(prefix_path, platform, build, activate)


def build(p: BuildPlan) -> int:
    """Write build.sh and run it (output streams through); activate.sh once it succeeded."""
    p.prefix.mkdir(parents=True, exist_ok=True)
    script = p.prefix / "build.sh"
    script.write_text(p.build_script)
    rc = subprocess.call(["bash", str(script)])
    if rc == 0:
        (p.prefix / "activate.sh").write_text(p.activate_script)
    return rc


def check(python: str | None = None, expect_plugin: bool = False) -> list[dict[str, Any]]:
    """Run the probe inside the environment (a separate process: torch is imported there)."""
    cmd = [python or sys.executable, "-m", "xmoectl.probe"]
    if expect_plugin:
        cmd.append("--expect-plugin")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return [{"name": "python", "ok": False, "detail": f"{cmd[0]}: {e}"}]
    results = []
    for line in out.stdout.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict) and "name" in item:
            results.append(item)
    if not results:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        results.append(
            {"name": "python", "ok": False, "detail": f"{cmd[0]} -m xmoectl.probe: {tail}"}
        )
    return results
