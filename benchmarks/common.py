"""Small helpers shared by the benchmarks: process groups, timing, peak memory, JSON output."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world, device) from torchrun's environment; a single process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        # before the process group, or NCCL collectives can hang
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device == "cuda" else "gloo", device_id=dev if device == "cuda" else None
        )
    return rank, world, dev


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_step(step: Callable[[], None], dev: torch.device, warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of `iters` calls of `step`, after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    sync(dev)
    times = []
    for _ in range(iters):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_back_to_back(
    step: Callable[[], None], dev: torch.device, iters: int, repeats: int = 3
) -> float:
    """Milliseconds per call of `step` when `iters` calls are queued back to back with one
    wait at the end (the median of `repeats` such runs): the steady state of a training
    step, where the host runs ahead of the GPU unless the work itself waits for it.
    `time_step` waits after every call, so each call also pays for the host's head start."""
    if dev.type != "cuda":
        return median(time_step(step, dev, 0, iters))
    runs = []
    for _ in range(repeats):
        sync(dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        runs.append(start.elapsed_time(end) / iters)
    return median(runs)


def gpu_uuid(dev: torch.device) -> str | None:
    """The device's id as nvidia-smi takes it (it numbers the GPUs in bus order, torch in
    its own); None off CUDA."""
    if dev.type != "cuda":
        return None
    return f"GPU-{torch.cuda.get_device_properties(dev).uuid}"


class GpuSampler:
    """One GPU's SM clock (MHz) and board power (W), sampled by `nvidia-smi` every `ms`
    milliseconds inside the `with` block; `medians()` is empty where there is no GPU id
    or no nvidia-smi (a CPU run, another vendor's GPU)."""

    def __init__(self, gpu: str | None, ms: int = 50) -> None:
        self.gpu, self.ms = gpu, ms
        self.proc: subprocess.Popen | None = None
        self.samples: list[tuple[float, float]] = []

    def __enter__(self) -> GpuSampler:
        exe = shutil.which("nvidia-smi")
        if exe is None or self.gpu is None:
            return self
        query = "--query-gpu=clocks.sm,power.draw"
        cmd = [exe, "-i", self.gpu, query, "--format=csv,noheader,nounits", f"-lms={self.ms}"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        out, _ = self.proc.communicate()
        for line in out.splitlines():
            try:
                mhz, watts = (float(v) for v in line.split(","))
            except ValueError:  # "[N/A]", or a line cut short by the terminate
                continue
            self.samples.append((mhz, watts))

    def medians(self) -> dict:
        if not self.samples:
            return {}
        return {
            "sm_mhz": median([s[0] for s in self.samples]),
            "power_w": round(median([s[1] for s in self.samples]), 1),
        }


def time_sustained(
    step: Callable[[], None], dev: torch.device, ms_per_step: float, seconds: float, iters: int
) -> dict:
    """The step's back-to-back time after `seconds` of running it back to back, with the
    GPU's clock and power meanwhile: under a sustained load a GPU settles at its power
    limit and lowers its clock, the more the denser its work, so a short back-to-back run
    flatters GEMM-heavy code. `ms_per_step` must be the same on every rank (the max over
    ranks): it sets how many steps warm the GPU, and each rank must run as many."""
    if dev.type != "cuda" or seconds <= 0:
        return {}
    for _ in range(max(1, math.ceil(seconds * 1e3 / ms_per_step))):
        step()
    with GpuSampler(gpu_uuid(dev)) as sampler:
        ms = time_back_to_back(step, dev, iters)
    return {"ms_sustained": round(max_over_ranks(ms, dev), 3), **sampler.medians()}


def reset_memory(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gib(dev: torch.device) -> float:
    if dev.type != "cuda":
        return 0.0
    return torch.cuda.max_memory_allocated(dev) / 2**30


def max_over_ranks(value: float, dev: torch.device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine_name(dev: torch.device, world: int) -> str:
    if dev.type == "cuda":
        return f"{world}x {torch.cuda.get_device_name(dev)} (torch {torch.__version__})"
    return f"{world}x CPU (torch {torch.__version__})"


def write_results(path: str, machine: str, command: str, cases: list[dict], append: bool) -> None:
    """The {"date", "machine", "command", "cases"} file; with `append`, cases of an earlier
    run stay unless this run measured the same (gpus, routing, impl)."""
    out = Path(path)
    old: list[dict] = []
    commands = [command]
    if append and out.exists():
        prev = json.loads(out.read_text())
        keys = {(c["gpus"], c["routing"], c["impl"]) for c in cases}
        old = [c for c in prev.get("cases", []) if (c["gpus"], c["routing"], c["impl"]) not in keys]
        old = [{**c, "date": c.get("date", prev.get("date", ""))} for c in old]
        commands = [
            c for c in prev.get("command", "").split(" ; ") if c and c != command
        ] + commands
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "date": date.today().isoformat(),
        "machine": machine,
        "command": " ; ".join(commands),
        "cases": old + [{**c, "date": c.get("date", date.today().isoformat())} for c in cases],
    }
    out.write_text(json.dumps(doc, indent=1) + "\n")


# runtime calls that can hold the host until the GPU (or a copy) is done
BLOCKING_CALLS = (
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpy",
    "cudaMemcpyAsync",
    "cudaMalloc",
    "cudaFree",
    "cudaHostAlloc",
)


def _where(stack: list[dict]) -> tuple[str, str]:
    """The innermost named place (a Python frame when the trace has them, else a host op
    that is not an aten op) and the innermost aten op of a stack of open host events."""
    frames = [o for o in stack if o.get("cat") == "python_function" and _own_frame(o["name"])]
    named = frames or [
        o for o in stack if o.get("cat") != "python_function" and not o["name"].startswith("aten::")
    ]
    aten = [o for o in stack if o["name"].startswith("aten::")]
    return (
        named[-1]["name"][:70] if named else "(no host op)",
        aten[-1]["name"] if aten else "",
    )


def _own_frame(name: str) -> bool:
    """A Python frame of this project or of DeepSpeed, not of torch or the standard library."""
    return (
        "xmoe" in name or "deepspeed" in name or "benchmarks" in name
    ) and "<built-in" not in name


def gap_report(
    trace: Path, steps: int, min_us: float = 4.0, unit: str = "step", min_wait_us: float = 20.0
) -> str:
    """Where the GPU waits: idle time between kernels, charged to the host operation that
    launched the kernel ending each gap (the host was late to launch it). Then where the
    host waits: blocking runtime calls (`BLOCKING_CALLS`) of at least `min_wait_us`, by the
    place that made them (with `with_stack` profiles, the innermost frame of xmoe or
    DeepSpeed). `steps` is how many `unit`s the trace covers; figures are per unit."""
    ev = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted(
        (e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
        key=lambda e: e["ts"],
    )
    launch = {
        e["args"].get("correlation"): e
        for e in ev
        # Triton launches through the driver API (cuLaunchKernelEx), torch through the runtime
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    busy = sum(e["dur"] for e in gpu)
    # the gaps, each with the launch (time, host thread) of the kernel that ended it
    found: list[tuple[float, float, Any, str]] = []
    end = gpu[0]["ts"] + gpu[0]["dur"] if gpu else 0.0
    for k in gpu[1:]:
        idle = k["ts"] - end
        if idle >= min_us:
            lt = launch.get(k.get("args", {}).get("correlation"), {})
            found.append((lt.get("ts", k["ts"]), idle, lt.get("tid"), k["name"][:40]))
        end = max(end, k["ts"] + k["dur"])
    waits = [
        (e["ts"], e["dur"], e.get("tid"), e["name"])
        for e in ev
        if e.get("cat") == "cuda_runtime"
        and e["name"] in BLOCKING_CALLS
        and e["dur"] >= min_wait_us
    ]
    # one sweep in time order with a stack of open host ops per thread (they nest)
    ops = [e for e in ev if e.get("cat") in ("cpu_op", "user_annotation", "python_function")]
    items = [(o["ts"], 0, i) for i, o in enumerate(ops)]
    items += [(g[0], 1, i) for i, g in enumerate(found)] + [
        (w[0], 2, i) for i, w in enumerate(waits)
    ]
    stacks: dict[Any, list[dict]] = {}
    gaps: dict[str, list[float]] = {}
    held: dict[str, list[float]] = {}
    for ts, kind, i in sorted(items, key=lambda t: (t[0], t[1])):
        tid = ops[i].get("tid") if kind == 0 else (found[i][2] if kind == 1 else waits[i][2])
        stack = stacks.setdefault(tid, [])
        while stack and stack[-1]["ts"] + stack[-1]["dur"] < ts:
            stack.pop()
        if kind == 0:
            stack.append(ops[i])
        elif kind == 1:
            place, aten = _where([o for o in stack if o.get("cat") != "python_function"])
            gaps.setdefault(f"{place} -> {found[i][3]}", []).append(found[i][1])
        else:
            place, aten = _where(stack)
            held.setdefault(f"{place} {aten} {waits[i][3]}".replace("  ", " "), []).append(
                waits[i][1]
            )
    total = sum(sum(v) for v in gaps.values())
    span = (end - gpu[0]["ts"]) if gpu else 0.0
    lines = [
        f"== GPU timeline over {steps} {unit}(s): span {span / steps / 1e3:.3f} ms/{unit}, "
        f"kernels {busy / steps / 1e3:.3f} ms/{unit}, idle gaps >= {min_us:g} us "
        f"{total / steps / 1e3:.3f} ms/{unit}; largest, by the host op that launched next:"
    ]
    for key, v in sorted(gaps.items(), key=lambda kv: -sum(kv[1]))[:20]:
        lines.append(f"  {sum(v) / steps:9.1f} us/{unit}  x{len(v) / steps:5.1f}  {key}")
    if held:
        waited = sum(sum(v) for v in held.values())
        lines.append(
            f"== host blocked in runtime calls >= {min_wait_us:g} us: "
            f"{waited / steps / 1e3:.3f} ms/{unit}; largest, by where they were made:"
        )
        for key, v in sorted(held.items(), key=lambda kv: -sum(kv[1]))[:12]:
            lines.append(f"  {sum(v) / steps:9.1f} us/{unit}  x{len(v) / steps:5.1f}  {key}")
    return "\n".join(lines)


def profile_gaps(prof: Any, steps: int, unit: str = "step", keep: str = "") -> str:
    """`gap_report` of a finished torch.profiler run, read from its Chrome trace: written
    to `keep` when given (and left there), else to a temporary file."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(keep) if keep else Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        return gap_report(path, steps, unit=unit)
