"""Training metrics: one human line on stdout, one JSON object per log step in metrics.jsonl.

Fields of each `metrics.jsonl` record: step, loss, lm_loss, aux_loss, z_loss, lr,
grad_norm, tokens_per_s (global), tflops_per_gpu (MoE-correct, `xmoe.flops`), mfu (null
when no peak is known), peak_mem_gib, step_time_s, dropped_fraction, expert_load_max_mean
(per MoE layer: the busiest expert's tokens over the mean, 1.0 = balanced), skipped_steps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from xmoe.flops import datasheet_peak_tflops


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
        f"mem {r['peak_mem_gib']:.2f} GiB"
    )
