"""`xmoectl preflight`: measure a site's nodes inside an allocation and file the figures;
and `hardware`, the site's node as the planner sees it, measured figures preferred.

The measuring itself is `python -m xmoe.tools.preflight`, started here the way a training
job starts the trainer (the site's modules, variables and rendezvous, one srun task per
GPU; on the `local` site one process per local GPU). Its JSON lands in
`<site>.measured.json` beside a user's own profile, or in the user's config folder
(`~/.config/xmoe/site_profiles/`); the planner prefers those figures to the datasheet ones.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from xmoectl import UserError, resource_dir
from xmoectl.costmodel import Assumptions, Hardware
from xmoectl.sites import SiteProfile

EXIT_NO_PLUGIN = 3  # the measuring program's status when the network plugin is missing
MEASURED_SUFFIX = ".measured.json"

_SCRIPT = """#!/bin/bash
# xmoe preflight: measures GEMM rate, collectives and binding on the nodes of this allocation.
set -eo pipefail

{% include "environment.sh.j2" %}
{% if slurm %}
{% include "rendezvous_slurm.sh.j2" %}
srun --nodes={{ nodes|num }} --ntasks={{ nodes * tasks_per_node }} --ntasks-per-node={{ tasks_per_node|num }}{% for a in srun_args %} {{ a|q }}{% endfor %} \\
  {{ python|qx }} -u -m xmoe.tools.preflight{% for a in args %} {{ a|q }}{% endfor %}

{% elif tasks_per_node > 1 %}
{{ python|qx }} -m torch.distributed.run --standalone --nproc-per-node={{ tasks_per_node|num }} \\
  -m xmoe.tools.preflight{% for a in args %} {{ a|q }}{% endfor %}

{% else %}
{{ python|qx }} -u -m xmoe.tools.preflight{% for a in args %} {{ a|q }}{% endfor %}

{% endif %}
"""


def script(
    site: SiteProfile,
    nodes: int,
    out: Path,
    *,
    python: str = "",
    bindir: str = "",
    tasks_per_node: int = 0,
    extra_args: list[str] | tuple[str, ...] = (),
) -> str:
    """The shell script that runs the measuring program on `nodes` nodes of `site`."""
    from xmoectl import shell
    from xmoectl.render import environment_context, local_accelerators

    if nodes < 1:
        raise UserError(f"--nodes {nodes} must be >= 1")
    slurm = site.scheduler == "slurm"
    if not slurm and nodes != 1:
        raise UserError(f"site {site.name!r} runs on this machine only: use --nodes 1")
    if slurm:
        tpn = tasks_per_node or site.slurm.tasks_per_node
        srun_args = []
        if site.srun.cpus_per_task:
            srun_args.append(f"--cpus-per-task={site.srun.cpus_per_task}")
        if site.srun.gpus_per_task:
            srun_args.append(f"--gpus-per-task={site.srun.gpus_per_task}")
        if site.srun.gpu_bind:
            srun_args.append(f"--gpu-bind={site.srun.gpu_bind}")
        srun_args += list(site.srun.extra)
    else:
        tpn = tasks_per_node or site.node.gpus or local_accelerators()[1] or 1
        srun_args = []
    args = ["--out", str(out), *extra_args]
    if slurm and site.node.gpus and site.node.nics and nodes > 1:
        args.append("--expect-plugin")
    ctx = environment_context(site, bindir)
    ctx.update(
        slurm=slurm,
        nodes=nodes,
        tasks_per_node=tpn,
        srun_args=srun_args,
        python=python or sys.executable,
        args=args,
        interface=site.rendezvous.interface,
        port=site.rendezvous.port,
    )
    return shell.environment().from_string(_SCRIPT).render(**ctx)


def run(site: SiteProfile, nodes: int, *, workdir: Path | None = None, **kw: Any) -> dict[str, Any]:
    """Run the measurement here (inside the allocation on Slurm sites); its JSON result."""
    if site.scheduler == "slurm" and not os.environ.get("SLURM_JOB_ID"):
        raise UserError(
            f"xmoectl preflight measures inside an allocation: run it under "
            f"`salloc -N {nodes}` (or in a batch job), or use --dry-run to see the script"
        )
    work = Path(workdir or tempfile.mkdtemp(prefix="xmoe-preflight-"))
    work.mkdir(parents=True, exist_ok=True)
    out = work / "preflight.json"
    path = work / "preflight.sh"
    path.write_text(script(site, nodes, out, **kw))
    path.chmod(0o755)
    proc = subprocess.run(["bash", str(path)], cwd=work)
    if not out.is_file():
        raise UserError(
            f"preflight wrote no result (status {proc.returncode}); see the output above and {path}"
        )
    result = json.loads(out.read_text())
    result["exit_status"] = proc.returncode
    return result


def read_result(path: str) -> dict[str, Any]:
    """A result JSON written by a preflight run elsewhere (e.g. in a batch job)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--from {path}: not a readable preflight result ({e})") from None
    if not isinstance(data, dict) or data.get("schema") != 1:
        raise UserError(f"--from {path}: not a preflight result (no schema 1 object)")
    return data


def target(site: SiteProfile) -> Path:
    """Where the measured figures of `site` go: beside a user's profile when that folder
    is writable, else the user's config folder; never into the installed package."""
    if site.source:
        src = Path(site.source).resolve()
        if src.parent != resource_dir("site_profiles").resolve() and os.access(src.parent, os.W_OK):
            return src.with_name(site.name + MEASURED_SUFFIX)
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config_home / "xmoe" / "site_profiles" / (site.name + MEASURED_SUFFIX)


def failure(result: dict[str, Any]) -> str:
    """Why the result must not be filed ('' when it can be)."""
    plugin = result.get("plugin") or {}
    if plugin.get("needed") and not plugin.get("loaded"):
        return "; ".join(result.get("problems") or ["network plugin not loaded"])
    if "gemm_tflops" not in result:
        return "; ".join(result.get("problems") or ["the measurement did not finish"])
    return ""


def record(site: SiteProfile, result: dict[str, Any], path: Path | None = None) -> Path:
    """File `result` as the site's measured figures; refuses a failed measurement."""
    why = failure(result)
    if why:
        raise UserError(f"preflight failed, nothing recorded: {why}")
    dest = Path(path) if path else target(site)
    dest.parent.mkdir(parents=True, exist_ok=True)
    data = dict(result, site=site.name, profile=site.source)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(dest)
    return dest


def summary(result: dict[str, Any]) -> list[str]:
    """A few lines a person reads: the figures the planner will use, and any problems."""
    lines = [
        f"{result.get('nodes')} node(s) x {result.get('gpus_per_node')} ranks, "
        f"{result.get('device')} ({result.get('backend')})"
    ]
    if "gemm_tflops" in result:
        lines.append(
            f"GEMM {result['gemm_tflops']:g} TFLOP/s (median; slowest rank {result.get('gemm_tflops_min'):g})"
        )
    if result.get("hbm_gib"):
        lines.append(f"HBM {result['hbm_gib']:g} GiB, copy {result.get('copy_tbs', 0):g} TB/s")
    for key, name in (("intra_node", "inside a node"), ("inter_node", "across nodes")):
        part = result.get(key) or {}
        if "all_to_all_gbs" in part:
            lines.append(
                f"{name}: all-to-all {part['all_to_all_gbs']:g} GB/s per rank, "
                f"all-reduce bus {part['all_reduce_busbw_gbs']:g} GB/s ({part.get('ranks')} ranks)"
            )
    plugin = result.get("plugin") or {}
    if plugin.get("needed"):
        lines.append(
            f"network plugin: {'loaded ' + ', '.join(plugin.get('libraries', [])) if plugin.get('loaded') else 'MISSING'}"
        )
    lines.append(f"binding: {'ok' if result.get('binding_ok', True) else 'PROBLEM'}")
    lines += [f"problem: {p}" for p in result.get("problems", [])]
    return lines


def command_line(site: SiteProfile, nodes: int) -> str:
    return shlex.join(["xmoectl", "preflight", "--site", site.name, "--nodes", str(nodes)])


# --------------------------------------------------------------------------- reading, for the planner


def measured_candidates(site: SiteProfile) -> list[Path]:
    """Where preflight results for `site` may live: beside a user's profile, then the
    user's config folder (never inside the installed package)."""
    out = []
    if site.source:
        src = Path(site.source).resolve()
        if src.parent != resource_dir("site_profiles").resolve():
            out.append(src.with_name(site.name + MEASURED_SUFFIX))
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    out.append(config_home / "xmoe" / "site_profiles" / (site.name + MEASURED_SUFFIX))
    return out


def load_measured(site: SiteProfile) -> tuple[dict[str, Any], str] | None:
    """(measured values, file) of the first preflight result found for `site`."""
    for path in measured_candidates(site):
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise UserError(
                    f"{path}: unreadable preflight results ({e}); rerun `xmoectl preflight`"
                ) from None
            if not isinstance(data, dict):
                raise UserError(
                    f"{path}: preflight results must be a JSON object; rerun `xmoectl preflight`"
                )
            return data, str(path)
    return None


def _num(data: dict[str, Any], *keys: str) -> float:
    cur: Any = data
    for k in keys:
        if not isinstance(cur, dict) or k not in cur:
            return 0.0
        cur = cur[k]
    return (
        float(cur)
        if isinstance(cur, (int, float)) and not isinstance(cur, bool) and cur > 0
        else 0.0
    )


def hardware(
    site: SiteProfile,
    measured: dict[str, Any] | None = None,
    a: Assumptions | None = None,
    ranks_per_node: int = 0,
) -> Hardware:
    """The site's node for the cost model: the profile's figures, measured ones preferred.

    `ranks_per_node` (default: every GPU) sets how many ranks share the node's NICs."""
    from xmoe.flops import datasheet_peak_tflops

    a = a or Assumptions()
    n = site.node
    gpn = ranks_per_node or n.gpus
    if not n.gpus or not n.hbm_gb:
        raise UserError(
            f"site {site.name!r} does not describe its accelerators (node.gpus, node.hbm_gb): "
            "the planner needs them; add them to the profile"
        )
    peak = n.peak_tflops_bf16 or datasheet_peak_tflops(n.gpu_model) or 0.0
    if not peak:
        raise UserError(f"site {site.name!r}: set node.peak_tflops_bf16 (bf16 TFLOP/s per GPU)")
    m = measured or {}
    intra = _num(m, "intra_node", "all_to_all_gbs") or n.intra_node_gbs or 50.0
    nic_total = n.nics * n.inter_node_gbs
    inter = _num(m, "inter_node", "all_to_all_gbs") or (nic_total / gpn if nic_total else 0.0)
    return Hardware(
        gpus_per_node=gpn,
        hbm_gib=_num(m, "hbm_gib") or n.hbm_gb,
        peak_tflops=peak,
        gemm_tflops=_num(m, "gemm_tflops") or peak * a.gemm_fraction,
        intra_gbs=intra,
        inter_gbs=inter,
        allreduce_intra_gbs=_num(m, "intra_node", "all_reduce_busbw_gbs") or intra,
        node_nic_gbs=_num(m, "inter_node", "all_reduce_busbw_gbs") or nic_total,
        hbm_tbs=_num(m, "copy_tbs") or 1.5,
        source="measured" if m else "datasheet",
    )
