"""Training metrics: one human line on stdout, one JSON object per log step in metrics.jsonl.

Fields of each `metrics.jsonl` record: step, loss, lm_loss, aux_loss, z_loss, lr,
grad_norm, tokens_per_s (global), tflops_per_gpu (MoE-correct, `xmoe.flops`), mfu (null
when no peak is known), peak_mem_gib, step_time_s, dropped_fraction, expert_load_max_mean
(per MoE layer: the busiest expert's tokens over the mean, 1.0 = balanced), skipped_steps,
dispatcher.

`dispatcher` holds the MoE dispatcher's exact counters (`Dispatched.stats`: rows, bytes...)
as per-step averages over the log window of the sums over all ranks, MoE layers and
micro-batches of a step (dispatch direction only; combine sends the same rows back), plus
`name` (`moe.dispatcher`). Ratios are recomputed from the summed counts (`dedup_ratio` =
routed_rows / pilot_rows) and per-layer sizes are averaged (`capacity`), never summed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from xmoe.flops import datasheet_peak_tflops
from xmoe.parallel.collectives import all_reduce_host

# counters that are not additive: a ratio from two summed counters; a per-layer size
DISPATCH_RATIOS = {"dedup_ratio": ("routed_rows", "pilot_rows")}
DISPATCH_MEANS = ("capacity",)
_FORWARDS = "layer_forwards"  # how many layer forwards the sums span (divides the means)


def add_dispatch_stats(sums: dict[str, float], stats: dict[str, Any]) -> None:
    """Add one layer forward's `Dispatched.stats` into `sums` (numbers only, in place)."""
    sums[_FORWARDS] = sums.get(_FORWARDS, 0.0) + 1.0
    for key, value in stats.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if key not in DISPATCH_RATIOS:
                sums[key] = sums.get(key, 0.0) + float(value)


def merge_dispatch_sums(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """`a + b` key by key (sums of two steps or windows)."""
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in sorted(set(a) | set(b))}


def dispatch_record(
    sums: dict[str, float], steps: int, name: str, group: Any = None, copies: int = 1
) -> dict[str, Any]:
    """The `dispatcher` entry of a record: `sums` (one rank's, over `steps` optimizer steps)
    summed over the ranks of `group` (default: all), divided by `copies` (ranks that each
    dispatched the same tokens, plain TP) and by `steps`.

    Collective: every rank calls it with the same keys (one dispatcher type everywhere).
    """
    keys = sorted(sums)
    out: dict[str, Any] = {"name": name}
    if not keys:
        return out
    t = all_reduce_host(torch.tensor([sums[k] for k in keys], dtype=torch.float64), group)
    total = dict(zip(keys, t.tolist()))
    forwards = max(1.0, total.pop(_FORWARDS, 1.0))
    for key, value in total.items():
        out[key] = value / forwards if key in DISPATCH_MEANS else value / copies / max(1, steps)
    for key, (num, den) in DISPATCH_RATIOS.items():
        if num in total and den in total:
            out[key] = total[num] / total[den] if total[den] else 1.0
    return out


def resolve_peak_tflops(flag: float | None, cfg_value: float, device: torch.device) -> float | None:
    """Peak bf16 TFLOP/s per device for MFU: flag, config, XMOE_PEAK_TFLOPS, datasheet; else None."""
    for value in (flag, cfg_value, float(os.environ.get("XMOE_PEAK_TFLOPS", 0) or 0)):
        if value:
            return float(value)
    if device.type == "cuda":
        return datasheet_peak_tflops(torch.cuda.get_device_name(device))
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated device memory (GPU) or the process's peak resident set (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except ImportError:  # pragma: no cover - non-POSIX
        return 0.0


class MetricsWriter:
    """Writes metric records (rank 0 only): stdout line, JSONL file, optional TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                print(
                    "tensorboard is not installed: pip install 'xmoe[tensorboard]'; logging without it"
                )

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(format_line(record), flush=True)
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])
                elif isinstance(value, dict):  # e.g. dispatcher counters
                    for sub, v in value.items():
                        if isinstance(v, (int, float)):
                            self.tb.add_scalar(f"{key}/{sub}", v, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def format_line(r: dict[str, Any]) -> str:
    mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
    load = r.get("expert_load_max_mean") or []
    worst = f"{max(load):.2f}" if load else "-"
    return (
        f"step {r['step']:>6} | loss {r['loss']:.4f} (lm {r['lm_loss']:.4f} aux {r['aux_loss']:.3f} "
        f"z {r['z_loss']:.3f}) | lr {r['lr']:.2e} | gnorm {r['grad_norm']:.3f} | "
        f"{r['tokens_per_s']:.0f} tok/s | {r['tflops_per_gpu']:.3f} TFLOP/s/gpu | MFU {mfu} | "
        f"load max/mean {worst} | dropped {100 * r['dropped_fraction']:.1f}% | "
        f"mem {r['peak_mem_gib']:.2f} GiB{_rbd_part(r.get('dispatcher') or {})}"
    )


def _rbd_part(d: dict[str, Any]) -> str:
    """RBD's network saving for the stdout line (the other dispatchers cross nodes as PFT)."""
    if d.get("name") != "rbd" or "inter_node_rows" not in d:
        return ""
    return (
        f" | inter-node rows/step {d['inter_node_rows']:.0f} "
        f"(pft {d.get('pft_inter_node_rows', 0.0):.0f}) dedup {d.get('dedup_ratio', 1.0):.2f}x"
    )
