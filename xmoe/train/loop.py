"""The training loop: one readable function on top of the DeepSpeed engine.

`train(cfg, run_dir, ...)` sets up the parallel layout, model, engine and data, optionally
resumes, then runs `cfg.train.steps` optimizer steps. Each step is `train_step` (forward,
backward and optimizer update over the gradient-accumulation micro-batches); between steps
sit the reliability pieces of `xmoe.train.reliability`: a step with a non-finite loss is
skipped on every rank, the requeue signal checkpoints and exits, a watchdog aborts a hung
rank. Metrics are averaged over each log window and written by rank 0.
"""

from __future__ import annotations

import contextlib
import gc
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xmoe.config import Config
from xmoe.flops import flops_per_token
from xmoe.parallel.collectives import all_reduce_host
from xmoe.train.metrics import add_dispatch_stats, merge_dispatch_sums


@dataclass
class StepResult:
    """What one optimizer step measured on this rank (losses averaged over micro-batches)."""

    loss: float
    lm_loss: float
    aux_loss: float
    z_loss: float
    grad_norm: float
    lr: float
    tokens: int  # tokens this rank processed
    load_LE: torch.Tensor  # routed tokens per expert per MoE layer (this rank, all micro-batches)
    dropped_fraction: float
    # dispatcher counters summed over MoE layers and micro-batches (this rank; metrics.py)
    dispatch: dict[str, float] = field(default_factory=dict)


def train_step(engine: Any, data: Any, model: Any, accum: int, guard: Any = None) -> StepResult:
    """Forward/backward over `accum` micro-batches, then one optimizer update.

    With a `StepGuard`, all ranks agree before the update whether to apply it.
    """
    device = engine.device
    # loss parts summed on the device: no host sync between micro-batches, one read per step
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    moe = model.moe_layers()
    # the layers leave their statistics on the device: summed there, read once per step
    load_LE: Any = 0
    dropped: Any = 0.0
    dispatch: dict[str, float] = {}
    tokens = 0
    lr = engine.get_lr()[0]  # the rate this step's update uses
    for i in range(accum):
        batch = data.next_batch()
        if torch.device(device).type == "cuda":  # from pageable memory: waits for the GPU
            batch = batch.pin_memory()
        batch = batch.to(device, non_blocking=True)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        loss, parts = engine(inputs, targets)
        if guard is not None:
            loss = guard.poison(loss)
        engine.backward(loss)
        sums += torch.stack([loss.detach(), parts.lm_loss, parts.aux_loss, parts.z_loss]).double()
        if guard is not None and i == accum - 1:
            guard.before_update(bool(torch.isfinite(sums).all()))
        engine.step()  # DeepSpeed applies the update only at the accumulation boundary
        if moe:
            load_LE = load_LE + torch.stack([m.last_stats["tokens_per_expert"] for m in moe])
        for layer in moe:
            dropped = dropped + layer.last_stats["dropped_fraction"] / len(moe)
            add_dispatch_stats(dispatch, layer.last_stats.get("dispatcher", {}))
        tokens += inputs.numel()
    grad_norm = engine.get_global_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    loss, lm, aux, z = (sums / accum).tolist()
    if not moe:
        load_LE = torch.zeros(0, model.cfg.moe.num_experts, dtype=torch.long)
    load_LE = load_LE.long().cpu()
    dropped = float(dropped) / accum
    return StepResult(loss, lm, aux, z, grad_norm, lr, tokens, load_LE, dropped, dispatch)


def update_expert_bias(model: Any, load_LE: torch.Tensor) -> None:
    """Aux-loss-free balancing: move each router's bias by the step's global load."""
    for layer, load_E in zip(model.moe_layers(), load_LE):
        layer.router.update_expert_bias(load_E)


@dataclass
class Window:
    """Sums over one logging window, reduced across ranks when written."""

    steps: int = 0
    t0: float = field(default_factory=time.perf_counter)
    losses: torch.Tensor = field(default_factory=lambda: torch.zeros(5, dtype=torch.float64))
    tokens: int = 0
    load_LE: torch.Tensor | None = None
    skipped: int = 0  # steps whose update was skipped (non-finite loss); not in the sums
    dispatch: dict[str, float] = field(default_factory=dict)

    def add(self, r: StepResult) -> None:
        self.steps += 1
        self.losses += torch.tensor(
            [r.loss, r.lm_loss, r.aux_loss, r.z_loss, r.dropped_fraction], dtype=torch.float64
        )
        self.tokens += r.tokens
        self.load_LE = r.load_LE.clone() if self.load_LE is None else self.load_LE + r.load_LE
        self.dispatch = merge_dispatch_sums(self.dispatch, r.dispatch)


def _window_record(
    w: Window, step: int, last: StepResult, cfg: Config, pstate: Any, peak: float | None, device
) -> dict[str, Any]:
    elapsed = time.perf_counter() - w.t0
    steps = max(1, w.steps + w.skipped)
    # loss means over DP ranks; tokens and expert loads summed over all ranks
    losses = all_reduce_host(w.losses, pstate.dp_group) / (w.steps * pstate.dp)
    tokens = all_reduce_host(torch.tensor([float(w.tokens)], dtype=torch.float64))[0].item()
    load_LE = all_reduce_host(w.load_LE.double()) if w.load_LE is not None else None
    loss, lm, aux, z, dropped = losses.tolist()
    if pstate.tp > 1:
        tokens /= pstate.tp  # TP ranks of one group see the same tokens
    tokens_per_s = tokens / elapsed
    tflops = flops_per_token(cfg, dropped) * tokens_per_s / pstate.world / 1e12
    balance = []
    if load_LE is not None:
        mean = load_LE.mean(1).clamp_min(1e-9)
        balance = [round(v, 4) for v in (load_LE.max(1).values / mean).tolist()]
    from xmoe.train.metrics import dispatch_record, peak_memory_gib

    # per-step averages of all ranks' sums; plain-TP ranks each dispatch the same tokens
    copies = pstate.tp if pstate.tp > 1 and not cfg.parallel.ssmb else 1
    dispatch = dispatch_record(w.dispatch, w.steps, cfg.moe.dispatcher, copies=copies)

    return {
        "step": step,
        "loss": loss,
        "lm_loss": lm,
        "aux_loss": aux,
        "z_loss": z,
        "lr": last.lr,
        "grad_norm": last.grad_norm,
        "tokens_per_s": tokens_per_s,
        "tflops_per_gpu": tflops,
        "mfu": (tflops / peak) if peak else None,
        "peak_mem_gib": peak_memory_gib(device),
        "step_time_s": elapsed / steps,
        "dropped_fraction": dropped,
        "expert_load_max_mean": balance,
        "skipped_steps": w.skipped,
        "dispatcher": dispatch,
    }


def freeze_setup_objects() -> None:
    """Put what setup made (torch, DeepSpeed, the model: hundreds of thousands of objects)
    out of the cyclic collector's reach (`gc.freeze`), so that its full collections scan
    only what the steps create. Without it one walks them all at intervals: about 90 ms
    on a CPU, during which the host queues no work and the GPU idles. `gc.unfreeze()`
    hands them back (a process that trains twice, as the tests do, then frees them)."""
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def setup_frozen() -> Iterator[None]:
    """`freeze_setup_objects` for the block (the benchmarks' timed steps)."""
    freeze_setup_objects()
    try:
        yield
    finally:
        gc.unfreeze()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(
    cfg: Config,
    run_dir: Path,
    resume: bool = False,
    peak_tflops: float | None = None,
    stop_after: int | None = None,
) -> list[dict[str, Any]]:
    """Train `cfg` writing into `run_dir`; returns the metric records rank 0 wrote.

    `stop_after` ends this process after that many global steps (the schedule still
    spans `train.steps`): an interrupted run, for tests and planned restarts.
    """
    from xmoe.data import build_train_data
    from xmoe.model import Transformer
    from xmoe.parallel.launch import setup_parallel
    from xmoe.train import reliability
    from xmoe.train.checkpoint import resume_latest, save_checkpoint
    from xmoe.train.engine import build_engine
    from xmoe.train.metrics import MetricsWriter, resolve_peak_tflops

    t = cfg.train
    reliability.install_requeue_signal()  # before data workers fork, so they inherit it
    reliability.FaultPlan.from_env(0)  # a malformed XMOE_FAULT fails before any work
    pstate = setup_parallel(cfg)
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    is_main = pstate.rank == 0
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        reliability.clear_requeue_marker(run_dir)

    seed_everything(t.seed)  # identical dense init on every rank; experts seed themselves
    model = Transformer(cfg, pstate)
    engine = build_engine(cfg, model, pstate)
    accum = engine.gradient_accumulation_steps()
    device = torch.device(engine.device)
    data = build_train_data(cfg, pstate.dp_rank, pstate.dp)

    step = 0
    restored = resume_latest(engine, ckpt_dir, pstate) if resume else None
    if restored is not None:
        step, data_state, tag_dir = restored
        data.load_state_dict(data_state)
        if is_main:
            print(f"resumed from {tag_dir} at step {step}", flush=True)
    else:
        # ranks differ from here on only through their data (dropout-free model)
        seed_everything(t.seed + pstate.rank)
    if resume and is_main:
        reliability.trim_metrics(run_dir, step)  # records of steps lost with the last process
    guard = reliability.StepGuard(engine, pstate.rank, t.max_bad_steps)

    peak = resolve_peak_tflops(peak_tflops, t.peak_tflops, device)
    writer = MetricsWriter(run_dir, is_main, t.tensorboard)
    records: list[dict[str, Any]] = []
    if is_main:
        print(
            f"training {cfg.preset or 'custom'}: {t.steps} steps, world {pstate.world} "
            f"(tp {pstate.tp}, ep {pstate.ep}, dp {pstate.dp}), accumulation {accum}, "
            f"device {device.type}, peak {'n/a' if peak is None else f'{peak:g} TFLOP/s'}",
            flush=True,
        )
    window = Window()
    engine.train()
    last_step = t.steps if stop_after is None else min(t.steps, stop_after)
    watchdog = reliability.Watchdog(t.hang_timeout_s, pstate.rank).start(step)
    last_good: StepResult | None = None
    freeze_setup_objects()
    try:
        while step < last_step:
            guard.before_step(step + 1)
            result = train_step(engine, data, model, accum, guard)
            step += 1
            guard.after_update()  # raises StopTraining after too many bad steps in a row
            watchdog.beat(step)
            if guard.skipped:
                window.skipped += 1
                if is_main:
                    print(
                        f"step {step}: non-finite loss, update skipped on every rank "
                        f"({guard.bad_in_a_row} in a row, limit {t.max_bad_steps})",
                        flush=True,
                    )
            else:
                last_good = result
                if cfg.moe.expert_bias:
                    update_expert_bias(model, all_reduce_host(result.load_LE))
                window.add(result)
            if step % t.log_interval == 0 or step == last_step:
                shown = last_good or result
                record = _window_record(window, step, shown, cfg, pstate, peak, device)
                writer.write(record)
                records.append(record)
                window = Window()
            # the last step saves too, so a finished or stopped run can always be continued
            saved = t.save_interval and (step % t.save_interval == 0 or step == last_step)
            if saved or guard.stop_requested:
                save_checkpoint(
                    engine, ckpt_dir, step, cfg.to_yaml(), data.state_dict(), pstate, t.keep_last
                )
                window.t0 = time.perf_counter()  # saving is not training time
                watchdog.beat()
            if guard.stop_requested and step < last_step:
                if is_main:
                    reliability.write_requeue_marker(run_dir, step)
                raise reliability.StopTraining(
                    reliability.EXIT_REQUEUE,
                    f"requeue signal received: checkpoint written at step {step}; exiting "
                    f"with {reliability.EXIT_REQUEUE} so the job runs again and resumes",
                )
    except reliability.StopTraining as stop:
        if is_main:
            print(f"xmoe: {stop.message}", file=sys.stderr, flush=True)
        raise
    finally:
        watchdog.stop()
        writer.close()
        gc.unfreeze()
    return records
