"""Site profiles: what a cluster is (hardware, Slurm, launcher, modules, variables, Python).

A site is data, never code: one YAML file per site, read with `yaml.safe_load` and checked
against the dataclasses below. Profiles are searched in `./site_profiles`, each folder of
`$XMOE_SITE_PATH`, the user's config folder (`~/.config/xmoe/site_profiles`) and finally the
profiles bundled with xmoectl; the first file named `<site>.yaml` wins.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xmoectl import UserError, resource_dir

LAUNCHERS = ("srun", "torchrun")
SCHEDULERS = ("slurm", "local")
PLATFORMS = ("cpu", "cuda", "rocm", "auto")
MANAGERS = ("venv", "conda")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TIME = re.compile(r"(\d+-)?\d+(:\d{1,2}){0,2}\Z")


class SiteError(UserError):
    """A missing, unknown or malformed site profile."""


@dataclass
class NodeSpec:
    """One compute node, as the planner and the MFU accounting see it."""

    gpus: int = 0  # accelerators per node (GCDs on MI250X); 0 = CPU only
    gpu_model: str = ""
    hbm_gb: float = 0.0
    peak_tflops_bf16: float = 0.0  # per accelerator; 0 = unknown (the trainer decides)
    cores: int = 1  # usable CPU cores per node
    intra_node_link: str = ""
    intra_node_gbs: float = 0.0  # GB/s per accelerator
    nic: str = ""
    nics: int = 0
    inter_node_gbs: float = 0.0  # GB/s per NIC


@dataclass
class SlurmSpec:
    """Batch-job defaults; every value becomes one `#SBATCH` line."""

    account: str = ""
    partition: str = ""
    qos: str = ""
    constraint: str = ""
    time: str = "01:00:00"
    tasks_per_node: int = 1  # ranks per node (one per accelerator, or CPU processes)
    gpus_per_node: int = 0  # `--gpus-per-node`; 0 = not asked (whole-node sites such as Frontier)
    core_spec: int = 0  # `-S`: cores kept for the system; 0 = site default
    # seconds before the time limit the ranks get the requeue signal (checkpoint, requeue)
    requeue_grace_s: int = 120
    # times a job may requeue itself at the time limit before it stops for good (0 = never)
    max_restarts: int = 10
    extra_sbatch: list[str] = field(default_factory=list)  # e.g. "--network=disable_rdzv_get"


@dataclass
class SrunSpec:
    """Flags of the `srun` that starts the ranks (or one torchrun per node)."""

    cpus_per_task: int = 0
    gpus_per_task: int = 0
    gpu_bind: str = ""
    extra: list[str] = field(default_factory=list)


@dataclass
class RendezvousSpec:
    """Where rank 0 listens: the first node of the job, on the named interface if given."""

    interface: str = ""  # e.g. hsn0: MASTER_ADDR = that interface's IPv4 on the first node
    port: int = 0  # 0 = derived from the job id, so concurrent jobs never collide


@dataclass
class PythonSpec:
    """How `xmoectl env build` makes the site's Python environment."""

    platform: str = "cpu"  # cpu | cuda | rocm | auto (local: cuda when nvidia-smi works)
    manager: str = "venv"  # venv | conda
    python: str = "python3"  # interpreter (venv) or version (conda) to build from
    torch_index: str = ""  # pip index holding the platform's torch wheels
    requirements: str = ""  # pinned set; default env/<platform>.txt
    prefix: str = ""  # where the environment lives; jobs source <prefix>/activate.sh
    cc: str = ""  # C compiler for source builds (Frontier: the Cray gcc-native)
    cxx: str = ""
    extra_pip: list[str] = field(default_factory=list)


@dataclass
class SiteProfile:
    """Everything xmoectl needs to know to build for, render for and submit to one site."""

    name: str = ""
    description: str = ""
    scheduler: str = "slurm"  # slurm | local (run the trainer on this machine)
    launcher: str = "srun"  # srun (ranks from SLURM_*) | torchrun
    node: NodeSpec = field(default_factory=NodeSpec)
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    srun: SrunSpec = field(default_factory=SrunSpec)
    modules: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    # VARIABLE -> folder on node-local storage, created and exported before launch
    caches: dict[str, str] = field(default_factory=dict)
    rendezvous: RendezvousSpec = field(default_factory=RendezvousSpec)
    python: PythonSpec = field(default_factory=PythonSpec)
    source: str = ""  # the file it was read from (filled in by the loader)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source")
        return data


# --------------------------------------------------------------------------- search path


def search_path() -> list[Path]:
    """Folders searched for `<site>.yaml`, first match wins."""
    dirs = [Path.cwd() / "site_profiles"]
    dirs += [Path(p) for p in os.environ.get("XMOE_SITE_PATH", "").split(os.pathsep) if p]
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    dirs.append(config_home / "xmoe" / "site_profiles")
    dirs.append(resource_dir("site_profiles"))
    seen, out = set(), []
    for d in dirs:
        key = d.resolve() if d.exists() else d
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def available() -> dict[str, Path]:
    """Every site name on the search path and the file that defines it."""
    found: dict[str, Path] = {}
    for d in search_path():
        if d.is_dir():
            for f in sorted(d.glob("*.yaml")):
                found.setdefault(f.stem, f)
    return found


def find(name: str) -> Path:
    sites = available()
    if name in sites:
        return sites[name]
    close = difflib.get_close_matches(name, list(sites), n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise SiteError(
        f"unknown site {name!r}: {hint}(known: {', '.join(sorted(sites))}; "
        "add site_profiles/<name>.yaml or a folder in $XMOE_SITE_PATH)"
    )


def load(name_or_file: str) -> SiteProfile:
    """A site by name (search path) or by a path to its YAML file."""
    p = Path(name_or_file)
    path = p if (p.suffix in (".yaml", ".yml") or os.sep in name_or_file) else find(name_or_file)
    if not path.is_file():
        raise SiteError(f"site profile {name_or_file!r} does not exist")
    return parse(path.read_text(), str(path), default_name=path.stem)


# --------------------------------------------------------------------------- parsing


def parse(text: str, origin: str, default_name: str = "") -> SiteProfile:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark is not None else ""
        raise SiteError(f"{origin}:{where} not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise SiteError(f"{origin}: a site profile is a mapping of fields (name, node, slurm, ...)")
    prof = _build(SiteProfile, data, origin, "")
    prof.name = prof.name or default_name
    prof.source = origin
    check(prof, origin)
    return prof


def _build(cls: type, data: Any, origin: str, where: str) -> Any:
    if not isinstance(data, dict):
        raise SiteError(f"{origin}: field {where or 'profile'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise SiteError(f"{origin}: unknown field {path}{hint} (known: {', '.join(names)})")
        kwargs[key] = _value(value, hints[key], origin, path)
    return cls(**kwargs)


def _value(value: Any, tp: Any, origin: str, where: str) -> Any:
    def bad(what: str) -> SiteError:
        return SiteError(f"{origin}: field {where} must be {what}, got {value!r}")

    if dataclasses.is_dataclass(tp):
        return _build(tp, value, origin, where)
    origin_tp = typing.get_origin(tp)
    if origin_tp is list:
        if not isinstance(value, list):
            raise bad("a list")
        (item,) = typing.get_args(tp)
        return [_value(v, item, origin, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin_tp is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return {str(k): _value(v, str, origin, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad("a whole number >= 0")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise bad("a number >= 0")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise bad("a string")
        return str(value)
    raise bad(str(tp))  # pragma: no cover - every annotation above is handled


def _one_line(value: str, origin: str, where: str) -> None:
    # `#SBATCH` lines are parsed by sbatch, not by a shell: a newline would end the comment
    # and turn the rest into a command, so values bound for them must stay on one line.
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise SiteError(f"{origin}: field {where} must be one line without control characters")


def _choice(value: str, choices: tuple[str, ...], origin: str, where: str) -> None:
    if value not in choices:
        raise SiteError(f"{origin}: field {where}={value!r} must be one of {', '.join(choices)}")


def check(p: SiteProfile, origin: str) -> None:
    """Cross-field rules the types alone cannot express."""
    if not _IDENT.match(p.name.replace("-", "_")):
        raise SiteError(f"{origin}: field name={p.name!r} must be letters, digits, '-' or '_'")
    _choice(p.scheduler, SCHEDULERS, origin, "scheduler")
    _choice(p.launcher, LAUNCHERS, origin, "launcher")
    _choice(p.python.platform, PLATFORMS, origin, "python.platform")
    _choice(p.python.manager, MANAGERS, origin, "python.manager")
    if p.slurm.tasks_per_node < 1:
        raise SiteError(f"{origin}: field slurm.tasks_per_node must be >= 1")
    if p.node.gpus and p.slurm.tasks_per_node > p.node.gpus:
        raise SiteError(
            f"{origin}: field slurm.tasks_per_node={p.slurm.tasks_per_node} exceeds "
            f"node.gpus={p.node.gpus}: use one task per accelerator"
        )
    for name in ("account", "partition", "qos", "constraint", "time"):
        _one_line(getattr(p.slurm, name), origin, f"slurm.{name}")
    if p.slurm.max_restarts < 0:
        raise SiteError(f"{origin}: field slurm.max_restarts must be >= 0 (0 = never requeue)")
    # submitit always asks Slurm for a warning signal, so "no warning" cannot be honoured:
    # refuse it rather than submit a job that differs from the rendered script.
    if p.slurm.requeue_grace_s < 1:
        raise SiteError(
            f"{origin}: field slurm.requeue_grace_s must be >= 1 (seconds of warning before the time limit)"
        )
    if p.slurm.time and not _TIME.match(p.slurm.time):
        raise SiteError(
            f"{origin}: field slurm.time={p.slurm.time!r} must look like [D-]HH:MM:SS or minutes"
        )
    for i, line in enumerate(p.slurm.extra_sbatch):
        _one_line(line, origin, f"slurm.extra_sbatch[{i}]")
        if not line.startswith("--"):
            raise SiteError(
                f"{origin}: field slurm.extra_sbatch[{i}]={line!r} must be an option such as --network=..."
            )
    for section in ("env", "caches"):
        for key in getattr(p, section):
            if not _IDENT.match(key):
                raise SiteError(
                    f"{origin}: field {section}.{key!r} is not a valid environment variable name"
                )


def check_slurm_value(value: str, what: str) -> str:
    """Refuse a command-line value bound for an `#SBATCH` line that would break out of it."""
    _one_line(value, "command line", what)
    return value
