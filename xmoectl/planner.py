"""Choose a run's parallel layout from the site's nodes: behind `xmoectl plan` and `submit`.

`make_plan(cfg, site, nodes)` enumerates layouts (TP with SSMB, EP, dispatcher PFT or RBD,
micro-batch, activation checkpointing, ZeRO stage, dropless or capacity factor), predicts
each one's per-GPU memory and step time with `xmoectl.costmodel`, rejects those that do not
fit the GPU's memory (saying by how much) and ranks the rest by predicted step time.
Layout fields the user fixed (`--set parallel.ep=8`) are kept as given. When nothing fits,
the plan names the smallest node count that would.

Measured figures written by `xmoectl preflight` (`<site>.measured.json`) replace the
datasheet ones of the site profile.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from xmoectl import UserError
from xmoectl.costmodel import Assumptions, Estimate, Hardware, Layout, evaluate
from xmoectl.preflight import hardware, load_measured
from xmoectl.sites import SiteProfile

# config field -> Layout attribute: what the planner chooses unless the user fixed it
LAYOUT_FIELDS = {
    "parallel.tp": "tp",
    "parallel.ep": "ep",
    "parallel.ssmb": "ssmb",
    "parallel.zero_stage": "zero_stage",
    "moe.dispatcher": "dispatcher",
    "moe.capacity_factor": "capacity_factor",
    "train.micro_batch": "micro_batch",
    "train.activation_checkpointing": "checkpointing",
}
DEFAULT_DISPATCHERS = ("pft", "rbd")
MAX_MICRO_BATCH = 64


class PlanError(UserError):
    """A plan that cannot be made from this input; the message says what to change."""


# --------------------------------------------------------------------------- enumeration


def fixed_fields(cfg: Any, overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Layout attributes the user set with `--set` (their values as the config holds them)."""
    from xmoe.config import parse_override

    fixed = {}
    for item in overrides:
        key, _ = parse_override(item)
        if key in LAYOUT_FIELDS:
            sec, name = key.split(".")
            fixed[LAYOUT_FIELDS[key]] = getattr(getattr(cfg, sec), name)
    return fixed


def config_layout(cfg: Any) -> Layout:
    """The layout a config already names (the preset's, or what the user wrote)."""
    p, e, t = cfg.parallel, cfg.moe, cfg.train
    return Layout(
        tp=p.tp,
        ep=p.ep,
        dispatcher=e.dispatcher,
        micro_batch=t.micro_batch,
        checkpointing=t.activation_checkpointing,
        zero_stage=p.zero_stage,
        capacity_factor=e.capacity_factor or None,
        ssmb=p.ssmb,
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def structural_problem(cfg: Any, layout: Layout, gpn: int, world: int) -> str:
    """Why `layout` cannot run at all on `world` ranks ('' when it can)."""
    m, e, t = cfg.model, cfg.moe, cfg.train
    if world % layout.tp or gpn % layout.tp:
        return f"TP{layout.tp} must divide the {gpn} GPUs of a node"
    if m.heads % layout.tp:
        return f"TP{layout.tp} does not divide the {m.heads} heads"
    if e.num_experts % layout.ep or world % layout.ep:
        return f"EP{layout.ep} must divide {e.num_experts} experts and {world} ranks"
    dp = world // layout.tp
    if t.global_batch % (layout.micro_batch * dp):
        return f"global batch {t.global_batch} is not a multiple of micro-batch x DP = {layout.micro_batch} x {dp}"
    if layout.tp > 1 and layout.micro_batch * m.seq_len % layout.tp:
        return f"micro-batch x seq_len is not divisible by TP{layout.tp}"
    if layout.dispatcher == "rbd" and (layout.ep <= gpn or layout.ep % gpn):
        return f"RBD needs EP spanning whole nodes (EP a multiple of {gpn}, > {gpn})"
    if e.recompute_permute and (layout.dispatcher != "pft" or layout.ep > 1):
        return "moe.recompute_permute needs PFT on one EP rank"
    return ""


def enumerate_layouts(
    cfg: Any,
    gpn: int,
    world: int,
    fixed: dict[str, Any] | None = None,
    dispatchers: tuple[str, ...] = DEFAULT_DISPATCHERS,
) -> list[Layout]:
    """Every runnable layout, with the `fixed` attributes held at the user's values."""
    fixed = fixed or {}
    m, e, t = cfg.model, cfg.moe, cfg.train
    cf = e.capacity_factor or None
    choices: dict[str, list[Any]] = {
        "tp": [x for x in (1, 2, 4, 8) if gpn % x == 0 and m.heads % x == 0],
        "ep": [x for x in _divisors(e.num_experts) if world % x == 0],
        "dispatcher": list(dispatchers),
        "micro_batch": [x for x in _divisors(t.global_batch) if x <= MAX_MICRO_BATCH],
        "checkpointing": [False, True],
        "zero_stage": [1, 2],
        "capacity_factor": list(dict.fromkeys([cf, None])),
        "ssmb": [True],
    }
    for name, value in fixed.items():
        choices[name] = [value]
    out = []
    for tp in choices["tp"]:
        for ep in choices["ep"]:
            for disp in choices["dispatcher"]:
                for mb in choices["micro_batch"]:
                    for ac in choices["checkpointing"]:
                        for z in choices["zero_stage"]:
                            for c in choices["capacity_factor"]:
                                for s in choices["ssmb"]:
                                    lay = Layout(tp, ep, disp, mb, ac, z, c, s)
                                    if not structural_problem(cfg, lay, gpn, world):
                                        out.append(lay)
    return out


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """A ranked set of layouts for one (model, site, node count), and the one chosen."""

    model: str
    site: str
    nodes: int
    gpus_per_node: int
    seq_len: int
    global_batch: int
    hardware: Hardware
    assumptions: Assumptions
    estimates: list[Estimate] = field(default_factory=list)  # fitting first, fastest first
    fixed: dict[str, Any] = field(default_factory=dict)
    measured_file: str = ""
    min_nodes: int | None = None  # when nothing fits: the smallest node count that would
    config_layout: Layout = field(default_factory=Layout)  # what the config itself names
    config_problem: str = ""  # why the config's own layout cannot run here ('' = it can)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def feasible(self) -> list[Estimate]:
        return [x for x in self.estimates if x.fits]

    @property
    def rejected(self) -> list[Estimate]:
        return [x for x in self.estimates if not x.fits]

    @property
    def chosen(self) -> Estimate | None:
        feasible = self.feasible
        return feasible[0] if feasible else None

    def overrides(self) -> list[str]:
        """The chosen layout as `--set` overrides (empty when nothing fits)."""
        return self.chosen.layout.overrides() if self.chosen else []

    def no_fit_message(self) -> str:
        best = min(self.estimates, key=lambda x: x.needed_gib) if self.estimates else None
        need = f" (the leanest layout, {best.layout.label()}, {best.reason})" if best else ""
        held = ", ".join(f"{k}={v}" for k, v in self.fixed.items())
        layouts = f"any layout with {held}" if held else "any layout"
        where = (
            f"{self.model} does not fit on {self.nodes} node(s) of {self.site} at {layouts}{need}"
        )
        if self.min_nodes:
            return f"{where}: the smallest node count that fits is {self.min_nodes} (--nodes {self.min_nodes})"
        return f"{where}, nor on any node count up to {NODE_SEARCH_LIMIT}: shorten model.seq_len or shrink the model"

    def to_dict(self, limit: int | None = None) -> dict[str, Any]:
        """JSON-ready; `limit` keeps that many fitting and that many rejected layouts."""
        from dataclasses import asdict

        chosen = self.chosen
        return {
            "model": self.model,
            "site": self.site,
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "world_size": self.world,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "hardware": asdict(self.hardware),
            "measured_file": self.measured_file,
            "assumptions": asdict(self.assumptions),
            "fixed": self.fixed,
            "config_layout": asdict(self.config_layout),
            "config_problem": self.config_problem,
            "chosen": chosen.to_dict() if chosen else None,
            "overrides": self.overrides(),
            "min_nodes": self.min_nodes,
            "feasible": len(self.feasible),
            "rejected": len(self.rejected),
            "layouts": [x.to_dict() for x in self._listed(limit)],
        }

    def _listed(self, limit: int | None) -> list[Estimate]:
        if limit is None:
            return self.estimates
        return self.feasible[:limit] + self.rejected[:limit]


NODE_SEARCH_LIMIT = 65536


def _changes(layout: Layout, base: Layout) -> int:
    return sum(getattr(layout, f) != getattr(base, f) for f in LAYOUT_FIELDS.values())


def rank(estimates: list[Estimate], base: Layout) -> list[Estimate]:
    """Fitting layouts fastest first (ties: fewer changes to the config, then less memory),
    then the rejected ones, fastest first."""
    return sorted(
        estimates,
        key=lambda x: (not x.fits, round(x.step_s, 9), _changes(x.layout, base), x.peak_gib),
    )


def make_plan(
    cfg: Any,
    site: SiteProfile,
    nodes: int,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    assumptions: Assumptions | None = None,
    dispatchers: tuple[str, ...] = DEFAULT_DISPATCHERS,
    gpus_per_node: int = 0,
    use_measured: bool = True,
    model_name: str = "",
    limits: dict[str, Any] | None = None,
) -> Plan:
    """Rank every layout of `cfg` on `nodes` nodes of `site`; see the module docstring.

    `limits` holds layout attributes at a value without the user having fixed them (what
    this installation can run)."""
    if nodes < 1:
        raise PlanError(f"--nodes {nodes} must be >= 1")
    a = assumptions or Assumptions()
    found = load_measured(site) if use_measured else None
    hw = hardware(site, found[0] if found else None, a, gpus_per_node)
    gpn = hw.gpus_per_node
    world = nodes * gpn
    if nodes > 1 and not hw.inter_gbs:
        raise PlanError(
            f"site {site.name!r} has no inter-node network in its profile (node.nics, "
            "node.inter_node_gbs): plan with --nodes 1 or describe the NICs"
        )
    fixed = fixed_fields(cfg, overrides)
    held = {**(limits or {}), **fixed}
    plan = Plan(
        model=model_name or cfg.preset or "custom",
        site=site.name,
        nodes=nodes,
        gpus_per_node=gpn,
        seq_len=cfg.model.seq_len,
        global_batch=cfg.train.global_batch,
        hardware=hw,
        assumptions=a,
        fixed=fixed,
        measured_file=found[1] if found else "",
    )
    plan.config_layout = replace(config_layout(cfg), **fixed)
    plan.config_problem = structural_problem(cfg, plan.config_layout, gpn, world)
    layouts = enumerate_layouts(cfg, gpn, world, held, dispatchers)
    if not plan.config_problem and plan.config_layout not in layouts:
        layouts.append(plan.config_layout)  # always shown beside the plan, e.g. `padded`
    if not layouts:
        simplest = replace(Layout(capacity_factor=cfg.moe.capacity_factor or None), **held)
        why = (
            structural_problem(cfg, simplest, gpn, world)
            or structural_problem(cfg, replace(config_layout(cfg), **held), gpn, world)
            or "no layout satisfies the constraints"
        )
        raise PlanError(f"no runnable layout of {plan.model} on {world} ranks: {why}")
    plan.estimates = rank([evaluate(cfg, lay, hw, world, a) for lay in layouts], plan.config_layout)
    if not plan.feasible:
        plan.min_nodes = smallest_fitting_nodes(cfg, hw, nodes, held, a)
    return plan


def _fits_somehow(
    cfg: Any, hw: Hardware, world: int, fixed: dict[str, Any], a: Assumptions
) -> bool:
    """Does the leanest layout fit on `world` ranks (global batch assumed adjustable)?"""
    m, e = cfg.model, cfg.moe
    tps = (
        [fixed["tp"]]
        if "tp" in fixed
        else [x for x in (1, 2, 4, 8) if hw.gpus_per_node % x == 0 and m.heads % x == 0]
    )
    eps = (
        [fixed["ep"]] if "ep" in fixed else [x for x in _divisors(e.num_experts) if world % x == 0]
    )
    for tp in tps:
        for ep in eps:
            lay = Layout(
                tp=tp,
                ep=ep,
                dispatcher=fixed.get("dispatcher", "pft"),
                micro_batch=fixed.get("micro_batch", 1),
                checkpointing=fixed.get("checkpointing", True),
                zero_stage=fixed.get("zero_stage", 2),
                capacity_factor=fixed.get("capacity_factor", e.capacity_factor or None),
                ssmb=fixed.get("ssmb", True),
            )
            if structural_problem(cfg, lay, hw.gpus_per_node, world):
                continue
            if evaluate(cfg, lay, hw, world, a).fits:
                return True
    return False


def smallest_fitting_nodes(
    cfg: Any, hw: Hardware, nodes: int, fixed: dict[str, Any], a: Assumptions
) -> int | None:
    """The fewest nodes above `nodes` on which the leanest layout runs and fits (None: none
    up to NODE_SEARCH_LIMIT). Doubling finds a node count that fits; below it, a scan (or
    bisection over wide ranges, where divisibility makes the answer approximate)."""
    gpn = hw.gpus_per_node
    hi = nodes * 2
    while hi <= NODE_SEARCH_LIMIT and not _fits_somehow(cfg, hw, hi * gpn, fixed, a):
        hi *= 2
    if hi > NODE_SEARCH_LIMIT:
        return None
    lo = max(nodes, hi // 2)  # does not fit (or is the starting count)
    if hi - lo <= 256:
        return next(n for n in range(lo + 1, hi + 1) if _fits_somehow(cfg, hw, n * gpn, fixed, a))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _fits_somehow(cfg, hw, mid * gpn, fixed, a):
            hi = mid
        else:
            lo = mid
    return hi


# --------------------------------------------------------------------------- entry points


def parse_dispatchers(text: str) -> tuple[str, ...]:
    from xmoectl.costmodel import DISPATCHERS

    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in names if x not in DISPATCHERS]
    if bad or not names:
        raise PlanError(f"--dispatchers {text!r}: choose from {', '.join(DISPATCHERS)}")
    return names


def plan_from_cli(
    site: SiteProfile,
    model: str,
    nodes: int,
    sets: list[str] | tuple[str, ...] = (),
    *,
    seq_len: int | None = None,
    global_batch: int | None = None,
    dispatchers: str = ",".join(DEFAULT_DISPATCHERS),
    imbalance: float | None = None,
    use_measured: bool = True,
) -> Plan:
    """What `xmoectl plan` computes: the config with its overrides, then the plan."""
    from xmoe.config import load_config

    overrides = list(sets)
    if seq_len is not None:
        overrides.append(f"model.seq_len={seq_len}")
    if global_batch is not None:
        overrides.append(f"train.global_batch={global_batch}")
    a = Assumptions()
    if imbalance is not None:
        if imbalance < 1:
            raise PlanError(
                f"--imbalance {imbalance} must be >= 1 (1 = perfectly balanced routing)"
            )
        a = replace(a, imbalance=imbalance)
    cfg = load_config(model, overrides)
    return make_plan(
        cfg,
        site,
        nodes,
        overrides=overrides,
        assumptions=a,
        dispatchers=parse_dispatchers(dispatchers),
        use_measured=use_measured,
        model_name=Path(model).stem if model.endswith((".yaml", ".yml")) else model,
    )


def load_recorded_plan(run_dir: Path) -> dict[str, Any] | None:
    """The plan.json a run directory recorded at its first submission (None: there is none)."""
    path = Path(run_dir) / "plan.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PlanError(f"{path}: unreadable ({e}); remove it to plan the layout afresh") from None
    return data if isinstance(data, dict) else None


def trainer_has_tp() -> bool:
    """Whether this xmoe runs TP > 1 (its sequence-sharded MoE block is installed)."""
    import importlib.util

    return importlib.util.find_spec("xmoe.moe.ssmb") is not None


def plan_for_submit(
    cfg: Any,
    site: SiteProfile,
    nodes: int,
    tasks_per_node: int,
    overrides: list[str] | tuple[str, ...],
    model_name: str = "",
    previous: dict[str, Any] | None = None,
) -> tuple[list[str], dict[str, Any] | None]:
    """(layout overrides to apply, plan record for plan.json) for `submit` / `render`.

    Nothing is planned for sites that do not describe their accelerators (CPU sites) or,
    on several nodes, their network. A
    resumed run keeps the layout of its recorded plan (its checkpoints depend on it). When
    nothing fits, the run is refused unless the user fixed every layout field.
    """
    if previous is not None:
        return list(previous.get("overrides") or []), previous
    if not site.node.gpus or not site.node.hbm_gb:
        return [], None
    if nodes > 1 and not (site.node.nics and site.node.inter_node_gbs):
        return [], None  # no network figures to plan with: submit the layout as configured
    fixed = fixed_fields(cfg, overrides)
    dispatchers = DEFAULT_DISPATCHERS
    limits = {}
    if "tp" not in fixed and not trainer_has_tp():
        limits["tp"] = 1
    plan = make_plan(
        cfg,
        site,
        nodes,
        overrides=overrides,
        limits=limits,
        dispatchers=dispatchers,
        gpus_per_node=tasks_per_node,
        model_name=model_name,
    )
    record = plan.to_dict(limit=20)
    if plan.chosen:
        return plan.overrides(), record
    if set(fixed) >= set(LAYOUT_FIELDS.values()):
        return [], record  # the user chose every field: submit as told, the record warns
    raise PlanError(
        plan.no_fit_message() + "; or fix every layout field with --set to submit anyway"
    )
