"""A plan for people and programs: the ranked table `xmoectl plan` prints, and its JSON."""

from __future__ import annotations

import json

from xmoectl.costmodel import Estimate
from xmoectl.planner import Plan


def format_plan(plan: Plan, top: int = 10, show_all: bool = False) -> str:
    """The human table: ranked fitting layouts, the rejected ones with reasons, the choice."""
    hw = plan.hardware
    lines = [
        f"plan: {plan.model} on {plan.site}, {plan.nodes} node(s) x {plan.gpus_per_node} GPUs "
        f"= {plan.world} ranks, seq {plan.seq_len}, global batch {plan.global_batch}",
        f"hardware ({hw.source}{': ' + plan.measured_file if plan.measured_file else ''}): "
        f"{hw.hbm_gib:g} GiB HBM, GEMM {hw.gemm_tflops:.0f} TFLOP/s "
        f"(peak {hw.peak_tflops:g}), all-to-all {hw.intra_gbs:g} GB/s in a node, "
        f"{hw.inter_gbs:g} GB/s per GPU across nodes",
    ]
    if plan.fixed:
        lines.append("fixed by you: " + ", ".join(f"{k}={v}" for k, v in plan.fixed.items()))
    head = f"{'#':>4}  {'layout':<42} {'need GiB':>8} {'step s':>9} {'tok/s':>10} {'TFLOP/s':>8} {'a2a %':>6}"
    feasible, rejected = plan.feasible, plan.rejected
    lines += ["", f"fitting layouts ({len(feasible)}), fastest first:", head]
    for i, x in enumerate(feasible if show_all else feasible[:top], 1):
        lines.append(_row(str(i), x))
    if not feasible:
        lines.append("     (none)")
    if plan.chosen and not show_all:
        # the rejected layouts that matter: those that would have beaten the chosen one
        faster = [x for x in rejected if x.step_s < plan.chosen.step_s]
        faster.sort(key=lambda x: x.needed_gib)
        title = (
            f"rejected layouts ({len(rejected)}); the {len(faster)} predicted faster than "
            "the chosen one, nearest to fitting first:"
        )
        rejected = faster
    elif not plan.chosen:
        rejected = sorted(rejected, key=lambda x: x.needed_gib)
        title = f"rejected layouts ({len(rejected)}), leanest first:"
    else:
        title = f"rejected layouts ({len(rejected)}), fastest first:"
    shown = rejected if show_all else rejected[:top]
    lines += ["", title]
    for x in shown:
        lines.append(f"      {x.layout.label():<42} {x.reason}")
    if len(shown) < len(rejected):
        lines.append(f"      ... {len(rejected) - len(shown)} more (--all lists every layout)")
    lines.append("")
    lines.append(_config_line(plan))
    if plan.chosen:
        c = plan.chosen
        lines.append(
            f"chosen: {c.layout.label()}  ({c.needed_gib:.1f} of {hw.hbm_gib:g} GiB, "
            f"{c.step_s:.3g} s/step, {c.time['tflops_per_gpu']:.1f} TFLOP/s per GPU predicted)"
        )
        lines.append("as config: " + " ".join(f"--set {o}" for o in plan.overrides()))
    else:
        lines.append("chosen: none. " + plan.no_fit_message())
    return "\n".join(lines) + "\n"


def config_estimate(plan: Plan) -> tuple[int, Estimate] | None:
    """(rank from 1, estimate) of the layout the config itself names, if it was enumerated."""
    for i, x in enumerate(plan.estimates, 1):
        if x.layout == plan.config_layout:
            return i, x
    return None


def _config_line(plan: Plan) -> str:
    lay = plan.config_layout
    found = config_estimate(plan)
    if found is None:
        why = plan.config_problem or "its dispatcher is not among those planned"
        return f"the config's own layout, {lay.label()}: not runnable here ({why})"
    i, x = found
    if not x.fits:
        return f"the config's own layout, {lay.label()}: rejected, {x.reason}"
    best = plan.chosen
    slower = x.step_s / best.step_s if best else 1.0
    return (
        f"the config's own layout, {lay.label()}: rank {i} of {len(plan.feasible)}, "
        f"{x.needed_gib:.1f} GiB, {x.step_s:.3g} s/step ({slower:.2f}x the chosen one's time)"
    )


def _row(tag: str, x: Estimate) -> str:
    t = x.time
    a2a = 100 * t["all_to_all"] / t["step"] if t["step"] else 0.0
    return (
        f"{tag:>4}  {x.layout.label():<42} {x.needed_gib:>8.1f} {t['step']:>9.3g} "
        f"{t['tokens_per_s']:>10.4g} {t['tflops_per_gpu']:>8.1f} {a2a:>6.1f}"
    )


def plan_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), indent=2) + "\n"
