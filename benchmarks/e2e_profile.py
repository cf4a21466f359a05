"""Where one training step's time goes: a torch.profiler trace sorted into categories.

Used by `benchmarks/e2e.py --profile`. The profiler records the step's last few
micro-batches and the optimizer update (a whole step of the small preset has 32
micro-batches per GPU: hundreds of thousands of events); per-micro-batch categories are
scaled to the whole step, the update and gradient sync counted once. In the window every
attention block, router, expert bank and MoE layer runs inside a named profiler scope
(`xmoe::<category>`, set by forward hooks) and the engine's `step` inside
`xmoe::optimizer`. Each operator's own device time (CPU time on CPU) goes to the first
of these that matches, walking from the operator up through its callers:

  1. the operator's name: collectives (all-to-all; any other one is `grad_sync`, ZeRO's
     gradient reduction and parameter gathering), fused attention, grouped GEMM;
  2. a `xmoe::` scope;
  3. a backward node (`autograd::engine::evaluate_function: ...`): the category of the
     forward operator that created it, found by its autograd sequence number;
  4. torch's `Optimizer.step` scope.
Anything else (embedding, norms, LM head and loss, residual adds) is `other`. On a MoE
layer whatever is not its router or experts (the dispatcher's own work: metadata,
permute, combine, DeepSpeed's dispatch einsums) is `permute_combine`.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

CATEGORIES = (
    "attention",
    "expert_gemm",
    "permute_combine",
    "all_to_all",
    "router",
    "optimizer",
    "grad_sync",
    "other",
)
BACKWARD = "autograd::engine::evaluate_function:"


def module_category(name: str, module: torch.nn.Module) -> str | None:
    """The category of a model submodule (by its class), or None to inherit the caller's."""
    kind = type(module).__name__
    if kind == "Attention":
        return "attention"
    if kind in ("Router", "TPRouter", "TopKGate"):
        return "router"
    if kind in ("GroupedExperts", "Experts") or name.endswith(".shared"):
        return "expert_gemm"
    if kind == "MoELayer":
        return "permute_combine"
    return None


def name_category(name: str) -> str | None:
    """Categories that an operator's own name decides, whatever scope it runs in."""
    low = name.lower()
    if "all_to_all" in low or "alltoall" in low:
        return "all_to_all"
    if any(c in low for c in ("all_reduce", "allreduce", "reduce_scatter", "all_gather",
                               "allgather", "broadcast", "nccl:", "gloo:")):  # fmt: skip
        return "grad_sync"
    if any(a in low for a in ("scaled_dot_product", "flash", "efficient_attention",
                               "cudnn_attention", "sdpa")):  # fmt: skip
        return "attention"
    if "grouped_mm" in low or "groupedmm" in low or "grouped_gemm" in low:
        return "expert_gemm"
    return None


def add_scopes(model: torch.nn.Module) -> list[Any]:
    """Forward hooks that run each categorised submodule inside `xmoe::<category>`."""
    handles = []
    for name, module in model.named_modules():
        cat = module_category(name, module)
        if cat is None:
            continue
        open_scopes: list[Any] = []

        def enter(_m, _inp, cat=cat, open_scopes=open_scopes):
            rf = record_function(f"xmoe::{cat}")
            rf.__enter__()
            open_scopes.append(rf)

        def leave(_m, _inp, _out, open_scopes=open_scopes):
            open_scopes.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def _self_time_us(evt: Any, on_device: bool) -> float:
    if not on_device:
        return float(evt.self_cpu_time_total)
    value = getattr(evt, "self_device_time_total", None)
    if value is None:  # older torch
        value = getattr(evt, "self_cuda_time_total", 0.0)
    return float(value)


def _scope_category(evt: Any) -> str | None:
    while evt is not None:
        if evt.name.startswith("xmoe::"):
            return evt.name[len("xmoe::") :]
        evt = evt.cpu_parent
    return None


def _cpu_events(events: list[Any]) -> list[Any]:
    """The host operators (not the Python frames of a `with_stack` profile)."""
    cpu = [
        e
        for e in events
        if str(getattr(e, "device_type", "CPU")).endswith("CPU")
        and not getattr(e, "is_python_function", False)
    ]
    return sorted(cpu, key=lambda e: e.time_range.start)


def forward_categories(events: list[Any]) -> dict[int, str]:
    """Autograd sequence number -> category of the forward operator that created the node."""
    forward_of: dict[int, str] = {}
    for evt in _cpu_events(events):
        seq = getattr(evt, "sequence_nr", -1)
        if seq is None or seq < 0 or _in_backward(evt):
            continue
        cat = _scope_category(evt)
        if cat is not None:
            # operators peek the next number before one of them creates the node: the last
            # of them in time order is the creator
            forward_of[seq] = cat
    return forward_of


def categorise(events: list[Any], on_device: bool) -> tuple[dict[str, float], list[tuple]]:
    """Self time per category (microseconds), and the operators with most self time: the
    ten overall and the five of each category, as (name, us, category, calls)."""
    forward_of = forward_categories(events)
    totals: dict[str, float] = defaultdict(float)
    per_op: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for evt in _cpu_events(events):
        us = _self_time_us(evt, on_device)
        if us <= 0:
            continue
        cat = _category(evt, forward_of)
        totals[cat] += us
        acc = per_op[evt.name, cat]
        acc[0] += us
        acc[1] += 1
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1][0])
    top = [(name, v[0], cat, v[1]) for (name, cat), v in ranked[:10]]
    for c in CATEGORIES:
        mine = [(name, v[0], cat, v[1]) for (name, cat), v in ranked if cat == c][:5]
        top += [t for t in mine if t not in top]
    return dict(totals), top


def _in_backward(evt: Any) -> bool:
    while evt is not None:
        if evt.name.startswith(BACKWARD):
            return True
        evt = evt.cpu_parent
    return False


def _category(evt: Any, forward_of: dict[int, str]) -> str:
    while evt is not None:
        name = evt.name
        cat = name_category(name)
        if cat is None and name.startswith("xmoe::"):
            cat = name[len("xmoe::") :]
        if cat is None and name.startswith(BACKWARD):
            cat = forward_of.get(getattr(evt, "sequence_nr", -1))
        if cat is None and name.startswith("Optimizer.step"):
            cat = "optimizer"
        if cat is not None:
            return cat
        evt = evt.cpu_parent
    return "other"


ONCE_PER_STEP = ("optimizer", "grad_sync")  # the update and ZeRO's reduction at its boundary


class _Window:
    """Starts the profiler at the forward of micro-batch `first` (1-based) of the step and
    stops it after the step's last `engine.step` call (the one that updates)."""

    def __init__(self, prof: Any, first: int, accum: int, device: torch.device) -> None:
        self.prof, self.first, self.accum, self.device = prof, first, accum, device
        self.forwards = self.steps = 0
        self.t0 = self.wall = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_forward(self, _module: Any, _inputs: Any) -> None:
        self.forwards += 1
        if self.forwards == self.first:
            self._sync()  # the window holds this micro-batch's work only
            self.prof.start()
            self.t0 = time.perf_counter()

    def after_engine_step(self) -> None:
        self.steps += 1
        if self.steps == self.accum:
            self._sync()
            self.wall = time.perf_counter() - self.t0
            self.prof.stop()


def profile_step(
    trainer: Any, is_main: bool, trace: str = "", micro_batches: int = 0, stack: bool = False
) -> dict[str, Any] | None:
    """One more `trainer.step()`; on the main rank its last `micro_batches` micro-batches
    (0 = all) and the update run under the profiler (`stack`: with Python frames).
    Returns the summary there.

    `trainer` is `benchmarks.e2e.BenchTrainer` (model, engine, accum, device, pstate, cfg,
    step). With fewer micro-batches than the step has, `step_ms` scales the per-micro-batch
    categories up to the whole step (the update and gradient sync happen once).
    """
    if not is_main:
        trainer.step()
        return None
    engine, device, accum = trainer.engine, trainer.device, trainer.accum
    n = accum if micro_batches <= 0 else min(micro_batches, accum)
    on_device = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    prof = profile(activities=acts, with_stack=stack)
    window = _Window(prof, accum - n + 1, accum, device)
    handles = add_scopes(trainer.model)
    handles.append(trainer.model.register_forward_pre_hook(window.on_forward))
    plain_step = engine.step

    def scoped_step(*args: Any, **kwargs: Any) -> Any:
        with record_function("xmoe::optimizer"):
            out = plain_step(*args, **kwargs)
        window.after_engine_step()
        return out

    engine.step = scoped_step
    try:
        trainer.step()
    finally:
        del engine.step
        for h in handles:
            h.remove()
    gaps = ""
    if on_device:  # where the GPU waits (for the host, a sync, a collective)
        from benchmarks.common import profile_gaps

        gaps = profile_gaps(prof, n, "micro-batch", trace)
    elif trace:
        prof.export_chrome_trace(trace)
    totals, top = categorise(list(prof.events()), on_device)
    scale = {c: 1.0 if c in ONCE_PER_STEP else accum / n for c in CATEGORIES}
    step_us = {c: totals.get(c, 0.0) * scale[c] for c in CATEGORIES}
    step_total = sum(step_us.values()) or 1.0
    return {
        "dispatcher": trainer.cfg.moe.dispatcher,
        "gpus": trainer.pstate.world,
        "layers": trainer.cfg.model.layers,
        "micro_batch": trainer.cfg.train.micro_batch,
        "capacity_factor": trainer.cfg.moe.capacity_factor,
        "grad_accum_dtype": trainer.cfg.train.grad_accum_dtype,
        "time": "device kernel time" if on_device else "CPU operator time",
        "micro_batches": f"{n} of {accum}",
        "window_s": round(window.wall, 4),
        "window_ms": round(sum(totals.values()) / 1e3, 3),
        "step_ms": round(step_total / 1e3, 3),
        "categories": {
            c: {
                "ms": round(totals.get(c, 0.0) / 1e3, 3),
                "step_ms": round(step_us[c] / 1e3, 3),
                "percent": round(100 * step_us[c] / step_total, 2),
            }
            for c in CATEGORIES
        },
        "gaps_per_micro_batch": gaps,
        "top_ops": [
            {"name": n, "ms": round(us / 1e3, 3), "category": c, "calls": k} for n, us, c, k in top
        ],
    }


def write_profiles(path: Path, doc: dict[str, Any], append: bool) -> None:
    """The profile JSON; with `append`, profiles of other runs (`e2e.run_key`) stay."""
    from benchmarks.e2e import run_key as key

    if append and path.is_file():
        mine = {key(p) for p in doc["profiles"]}
        old = json.loads(path.read_text()).get("profiles", [])
        doc = {**doc, "profiles": [p for p in old if key(p) not in mine] + doc["profiles"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def print_profile(p: dict[str, Any]) -> None:
    print(f"\nprofile: {p['dispatcher']} on {p['gpus']} ranks, micro-batch {p.get('micro_batch')}, "
          f"capacity factor {p.get('capacity_factor')}, rank 0's {p['time']}; "
          f"window of {p['micro_batches']} micro-batches + update: {p['window_s']:.3f} s wall, "
          f"{p['window_ms']:.1f} ms busy; whole step estimated {p['step_ms']:.1f} ms")  # fmt: skip
    print(f"  {'category':<16} {'window ms':>10} {'step ms':>10} {'% step':>7}")
    for cat, v in sorted(p["categories"].items(), key=lambda kv: -kv[1]["step_ms"]):
        print(f"  {cat:<16} {v['ms']:>10.2f} {v['step_ms']:>10.2f} {v['percent']:>6.1f}%")
    if p.get("gaps_per_micro_batch"):
        print("  " + p["gaps_per_micro_batch"].replace("\n", "\n  "))
    print("  top operators (window ms, calls) by category:")
    for cat in CATEGORIES:
        ops = [o for o in p["top_ops"] if o.get("category") == cat][:5]
        if ops:
            print(f"    {cat:<16} " + ", ".join(
                f"{o['name'][:48]} {o['ms']:.1f} ({o['calls']})" for o in ops))  # fmt: skip
