"""End-to-end training throughput: our dispatcher against DeepSpeed-MoE's, same model, same run.

Under torchrun, every rank trains the small preset (or `--config`) with EP = world size,
ZeRO-1, bf16 on GPUs, SDPA attention, the preset's capacity factor and the router's own
decisions (no forced balance) on the shipped text corpus (`--data synthetic` for random
tokens). The setup and the step are the trainer's own (`xmoe.train.loop.train_step` on
the `xmoe.train.engine` DeepSpeed engine, with the loop's step guard), minus checkpoints
and metric files. Each dispatcher of `--dispatchers` runs in turn: `--warmup` steps, then
`--steps` timed steps. Per run (one entry of `runs` in the JSON):

  tokens_per_s     global tokens per second over the timed steps
  tflops_per_gpu   MoE-correct training FLOPs (`xmoe.flops`, dropped rows excluded) / s / GPU
  mfu              tflops_per_gpu / --peak-tflops (989, the H200 datasheet bf16 figure)
  mfu_gemm         tflops_per_gpu / --gemm-tflops (780, dense bf16 GEMM measured on H200)
  peak_gib         peak allocated device memory, max over ranks (CPU: peak resident set)
plus the step time, dropped fraction and the busiest expert's load over the mean.

Layers: without `--layers`, as many of the preset's layers as the planner's memory model
(`xmoectl.costmodel`) fits on this GPU for every dispatcher of the run, at `--micro-batch`.

`--profile`: after the timed steps one more step runs; on rank 0 its last
`--profile-micro-batches` micro-batches and the update run under torch.profiler, whose
device time (CPU time on CPU) `benchmarks/e2e_profile.py` sorts into attention, expert
GEMMs, permute/combine, all-to-all, router, optimizer, gradient sync and other, scaled to
the whole step; printed as a table and written to `--profile-out`. `--trace FILE` also
keeps rank 0's Chrome trace of that window.

  torchrun --nproc_per_node 4 benchmarks/e2e.py --out benchmarks/results/e2e.json
  torchrun --nproc_per_node 4 benchmarks/e2e.py --dispatchers pft --profile \\
      --out benchmarks/results/e2e.json --append
  torchrun --nproc_per_node 2 benchmarks/e2e.py --device cpu --tiny --profile \\
      --out /tmp/e2e.json                                                  # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shlex
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xmoe.config import (  # noqa: E402
    Config,
    ConfigError,
    dedup_ep_active,
    dedup_fixed_active,
    load_config,
)
from xmoe.flops import flops_per_token  # noqa: E402
from xmoe.parallel.topology import close_distributed  # noqa: E402

GIB = 2**30
TINY = [
    "model.hidden=64", "model.heads=4", "model.vocab_size=320", "model.seq_len=64",
    "model.layers=2", "moe.num_experts=8", "moe.top_k=2", "moe.expert_hidden=32",
    "train.micro_batch=2",
]  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--append", action="store_true", help="merge into an existing --out file")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--config", default="small", help="preset name or YAML file")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    p.add_argument("--dispatchers", default=None, help="comma list [pft,deepspeed]")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SEC.KEY=V")
    p.add_argument(
        "--variant",
        dest="variants",
        action="append",
        default=[],
        metavar="SEC.KEY=V[,...]",
        help="one more run per dispatcher with these overrides on top (repeatable); "
        'e.g. --variant moe.capacity_factor=null. "" is the plain run',
    )
    p.add_argument("--layers", type=int, default=0, help="0 = as many as fit")
    p.add_argument("--micro-batch", type=int, default=0, help="0 = 2 (GPU) or the preset's")
    p.add_argument("--global-batch", type=int, default=0, help="0 = the preset's")
    p.add_argument("--data", choices=("sample", "synthetic"), default="sample")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--gemm-tflops", type=float, default=780.0)
    p.add_argument("--profile", action="store_true", help="profile one more step per run")
    p.add_argument(
        "--profile-micro-batches",
        type=int,
        default=4,
        help="profile the step's last N micro-batches and the update (0 = all)",
    )
    p.add_argument("--profile-out", default="", help="[<out dir>/e2e_profile.json]")
    p.add_argument("--trace", default="", help="Chrome trace of rank 0's profiled step")
    p.add_argument(
        "--profile-stack",
        action="store_true",
        help="record Python frames too: the host-wait report names the xmoe/DeepSpeed line "
        "(slower host: read its gaps with care)",
    )
    args = p.parse_args(argv)
    if args.warmup < 0 or args.steps < 1:
        p.error("--warmup must be >= 0 and --steps >= 1")
    return args


def typed_command(argv: list[str], world: int) -> str:
    """The command as typed, with paths relative to the repository (no machine paths)."""

    def rel(token: str) -> str:
        key, eq, value = token.partition("=") if token.startswith("--") else ("", "", token)
        if os.path.isabs(value):
            path = Path(value)
            value = os.path.relpath(path, ROOT) if path.is_relative_to(ROOT) else path.name
        return key + eq + value

    return f"torchrun --nproc_per_node {world} benchmarks/e2e.py " + shlex.join(
        rel(a) for a in argv
    )


def dispatchers_of(args: argparse.Namespace) -> list[str]:
    if args.dispatchers:
        return [d.strip() for d in args.dispatchers.split(",") if d.strip()]
    given = [o.split("=", 1)[1] for o in args.overrides if o.startswith("moe.dispatcher=")]
    return given[-1:] or ["pft", "deepspeed"]


def base_overrides(args: argparse.Namespace, world: int) -> list[str]:
    out = list(TINY) if args.tiny else []
    out += [f"parallel.ep={world}", "parallel.zero_stage=1", "parallel.tp=1"]
    out += [f"data.source={args.data}", "train.dtype=auto"]
    if args.micro_batch or (args.device == "cuda" and not args.tiny):
        out.append(f"train.micro_batch={args.micro_batch or 2}")
    return out + list(args.overrides)


def run_config(
    args: argparse.Namespace, world: int, dispatcher: str, layers: int, variant: str = ""
) -> Config:
    """The config of one run: preset, benchmark settings, user overrides, the dispatcher,
    then the variant's overrides."""
    over = base_overrides(args, world) + [f"moe.dispatcher={dispatcher}"]
    over += [v.strip() for v in variant.split(",") if v.strip()]
    if layers:
        over.append(f"model.layers={layers}")
    cfg = load_config(args.config, over)
    t = cfg.train
    if args.global_batch:
        t.global_batch = args.global_batch
    elif args.tiny:
        t.global_batch = 2 * t.micro_batch * world  # two micro-batches: accumulation runs
    t.steps = args.warmup + args.steps + (1 if args.profile else 0)
    t.warmup_steps = min(t.warmup_steps, t.steps)
    t.log_interval = t.steps
    return cfg


def fit_layers(args: argparse.Namespace, world: int, dispatchers: list[str], hbm_gib: float) -> int:
    """Most layers (up to the preset's) the planner's memory model fits for every dispatcher."""
    from xmoectl import preflight
    from xmoectl import sites as S
    from xmoectl.costmodel import Assumptions, Layout, evaluate

    a = Assumptions()
    site = S.load("h200")
    found = preflight.load_measured(site)
    hw = preflight.hardware(site, found[0] if found else None, a, ranks_per_node=world)
    hw = dataclasses.replace(hw, hbm_gib=hbm_gib)
    top = run_config(args, world, dispatchers[0], 0).model
    for layers in range(top.layers, top.dense_layers, -1):
        fits = True
        for d, v in ((d, v) for d in dispatchers for v in args.variants or [""]):
            cfg = run_config(args, world, d, layers, v)
            e, t = cfg.moe, cfg.train
            lay = Layout(ep=world, dispatcher=d, micro_batch=t.micro_batch,
                         checkpointing=t.activation_checkpointing, zero_stage=1,
                         capacity_factor=e.capacity_factor)  # fmt: skip
            fits = fits and evaluate(cfg, lay, hw, world, a).fits
        if fits:
            return layers
    raise ConfigError(
        f"not even {top.dense_layers + 1} layer(s) fit {hbm_gib:.0f} GiB at micro-batch "
        f"{args.micro_batch or 2}: lower --micro-batch or give --layers"
    )


# --------------------------------------------------------------------------- one run


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _over_ranks(values: list[float], op: str = "SUM") -> list[float]:
    """`values` reduced over all ranks (`all_reduce_host`: through the GPU under NCCL)."""
    import torch
    import torch.distributed as dist

    from xmoe.parallel.collectives import all_reduce_host

    t = torch.tensor(values, dtype=torch.float64)
    return all_reduce_host(t, op=getattr(dist.ReduceOp, op)).tolist()


class BenchTrainer:
    """The trainer's model, DeepSpeed engine, data and step guard for one config.

    Built the way `xmoe.train.loop.train` builds them (same seeds, so the same losses);
    `step()` is the loop's step: guard, `train_step`, expert-bias update.
    """

    def __init__(self, cfg: Config) -> None:
        import torch

        from xmoe.data import build_train_data
        from xmoe.model import Transformer
        from xmoe.parallel.launch import setup_parallel
        from xmoe.train import reliability
        from xmoe.train.engine import build_engine
        from xmoe.train.loop import seed_everything

        t = cfg.train
        self.cfg = cfg
        self.pstate = setup_parallel(cfg)
        self.device = torch.device(self.pstate.device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        seed_everything(t.seed)  # identical dense init on every rank, as in the loop
        self.model = Transformer(cfg, self.pstate)
        self.engine = build_engine(cfg, self.model, self.pstate)
        self.accum = self.engine.gradient_accumulation_steps()
        self.data = build_train_data(cfg, self.pstate.dp_rank, self.pstate.dp)
        seed_everything(t.seed + self.pstate.rank)
        self.guard = reliability.StepGuard(self.engine, self.pstate.rank, t.max_bad_steps)
        self.engine.train()
        self.steps_done = 0
        self.losses: list[float] = []

    def step(self) -> Any:
        from xmoe.parallel.collectives import all_reduce_host
        from xmoe.train.loop import train_step, update_expert_bias

        self.guard.before_step(self.steps_done + 1)
        r = train_step(self.engine, self.data, self.model, self.accum, self.guard)
        self.steps_done += 1
        self.guard.after_update()
        if self.cfg.moe.expert_bias and not self.guard.skipped:
            update_expert_bias(self.model, all_reduce_host(r.load_LE))
        self.losses.append(r.loss)
        return r

    def close(self) -> None:
        """Free the model and engine so that the next run starts from an empty GPU."""
        import torch
        import torch.distributed as dist

        self.guard.close()
        if hasattr(self.engine, "destroy"):  # DeepSpeed's: removes its hooks
            self.engine.destroy()
        for param in self.model.parameters():  # DeepSpeed binds methods of each param to it
            param.grad = None
            param.__dict__.clear()
        del param  # no local may keep any of it alive through the collection below
        del self.engine, self.model, self.data, self.guard
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        dist.barrier()


def measure(trainer: BenchTrainer, args: argparse.Namespace) -> dict[str, Any]:
    """`--warmup` untimed steps, then `--steps` timed ones; the run's record (all ranks)."""
    import torch
    import torch.distributed as dist

    from xmoe.train.metrics import peak_memory_gib

    cfg, device, world = trainer.cfg, trainer.device, trainer.pstate.world
    for _ in range(args.warmup):
        trainer.step()
    _sync(device)
    dist.barrier()
    t0 = time.perf_counter()
    timed = [trainer.step() for _ in range(args.steps)]
    _sync(device)
    elapsed = _over_ranks([time.perf_counter() - t0], "MAX")[0]

    tokens, dropped = _over_ranks(
        [float(sum(r.tokens for r in timed)), sum(r.dropped_fraction for r in timed)]
    )
    dropped /= world * args.steps
    load_LE = torch.stack([r.load_LE for r in timed]).sum(0).double()
    load_LE = torch.tensor(_over_ranks(load_LE.tolist()), dtype=torch.float64)
    balance = (load_LE.max(1).values / load_LE.mean(1).clamp_min(1e-9)).tolist()
    peak = _over_ranks([peak_memory_gib(device)], "MAX")[0]
    tokens_per_s = tokens / elapsed
    tflops = flops_per_token(cfg, dropped) * tokens_per_s / world / 1e12
    return {
        "dispatcher": cfg.moe.dispatcher,
        "gpus": world,
        "layers": cfg.model.layers,
        "tokens_per_s": _sig(tokens_per_s),
        "tflops_per_gpu": _sig(tflops),
        "mfu": _sig(tflops / args.peak_tflops),
        "mfu_gemm": _sig(tflops / args.gemm_tflops),
        "peak_gib": _sig(peak),
        "step_s": _sig(elapsed / args.steps),
        "micro_batch": cfg.train.micro_batch,
        "global_batch": cfg.train.global_batch,
        "seq_len": cfg.model.seq_len,
        "capacity_factor": cfg.moe.capacity_factor,
        "grad_accum_dtype": cfg.train.grad_accum_dtype,
        "fused_lm_loss": cfg.model.fused_lm_loss,
        "recompute_permute": cfg.moe.recompute_permute,
        "overlap_ep": cfg.moe.overlap_ep,
        "dedup_ep": dedup_ep_active(cfg.moe, cfg.moe.dispatcher, cfg.parallel.ep),
        "dedup_fixed_slots": dedup_fixed_active(cfg.moe, cfg.moe.dispatcher, cfg.parallel.ep),
        "dropped_fraction": round(dropped, 4),
        "load_max_mean": round(max(balance), 3) if balance else None,
        "data": cfg.data.source,
        "losses": [round(v, 4) for v in trainer.losses],  # this rank's, warm-up included
    }


# --------------------------------------------------------------------------- results


def run_key(r: dict) -> tuple:
    """What makes two runs the same measurement (a later one replaces an earlier one)."""
    return (
        r["dispatcher"], r["gpus"], r["layers"], r.get("micro_batch"), r.get("capacity_factor"),
        r.get("grad_accum_dtype", "model"), r.get("fused_lm_loss", False),
        r.get("recompute_permute", False), r.get("overlap_ep", False), r.get("dedup_ep", False),
        r.get("dedup_fixed_slots", False),
    )  # fmt: skip


def write_results(path: Path, doc: dict, append: bool) -> None:
    """Write the e2e JSON; with `append`, runs of another `run_key` stay."""
    if append and path.is_file():
        old = json.loads(path.read_text())
        keys = {run_key(r) for r in doc["runs"]}
        kept = [r for r in old.get("runs", []) if run_key(r) not in keys]
        commands = [c for c in old.get("command", "").split(" ; ") if c and c != doc["command"]]
        doc = {
            **doc,
            "command": " ; ".join(commands + [doc["command"]]),
            "runs": kept + doc["runs"],
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def machine_name(device: Any, world: int) -> str:
    import torch

    try:
        import deepspeed

        ds = f", DeepSpeed {deepspeed.__version__}"
    except ImportError:
        ds = ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return f"{world}x {name} (torch {torch.__version__}{ds})"


def print_table(runs: list[dict]) -> None:
    print(f"{'dispatcher':<10} {'gpus':>4} {'layers':>6} {'mb':>3} {'cf':>5} {'tok/s':>10} "
          f"{'TF/s/GPU':>9} {'MFU':>6} {'MFU780':>7} {'peak GiB':>9} {'step s':>7} "
          f"{'dropped':>7} {'load':>5} {'grad acc':>8} options")  # fmt: skip
    for r in runs:
        cf = r.get("capacity_factor") or "-"
        print(f"{r['dispatcher']:<10} {r['gpus']:>4} {r['layers']:>6} {r.get('micro_batch', 0):>3} "
              f"{cf:>5} {r['tokens_per_s']:>10.0f} {r['tflops_per_gpu']:>9.1f} "
              f"{100 * r['mfu']:>5.1f}% {100 * r['mfu_gemm']:>6.1f}% {r['peak_gib']:>9.2f} "
              f"{r['step_s']:>7.3f} {100 * r['dropped_fraction']:>6.1f}% "
              f"{r.get('load_max_mean') or 0:>5.1f} {r.get('grad_accum_dtype', 'model'):>8} "
              f"{_options(r)}")  # fmt: skip
    by = {run_key(r): r["tokens_per_s"] for r in runs}
    for (d, gpus, layers, mb, cf, acc, fused, recompute, overlap, dedup, fixed), tps in by.items():
        # against DeepSpeed's run with the same head (its dispatcher has none of the options)
        base = by.get(("deepspeed", gpus, layers, mb, cf, acc, fused, False, False, False, False))
        if d != "deepspeed" and base:
            opts = _options(
                {"fused_lm_loss": fused, "recompute_permute": recompute,
                 "overlap_ep": overlap, "dedup_ep": dedup, "dedup_fixed_slots": fixed}
            )  # fmt: skip
            print(
                f"{d} / deepspeed throughput on {gpus} ranks, {layers} layers, micro-batch {mb}, "
                f"capacity factor {cf}{f' ({opts})' if opts else ''}: {tps / base:.2f}x"
            )


def _options(r: dict) -> str:
    """The run's non-default model options, for the table."""
    names = {
        "fused_lm_loss": "fused LM loss",
        "recompute_permute": "recompute permute",
        "overlap_ep": "overlap EP",
        "dedup_ep": "dedup EP",
        "dedup_fixed_slots": "fixed slots",
    }
    return ", ".join(label for key, label in names.items() if r.get(key))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the trainer picks CUDA whenever it sees one
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    import torch

    from xmoe.train.loop import setup_frozen

    try:
        dispatchers = dispatchers_of(args)
        layers = args.layers
        if not layers and args.device == "cuda" and not args.tiny:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            hbm = torch.cuda.get_device_properties(local).total_memory / GIB
            layers = fit_layers(args, world, dispatchers, hbm)
            if rank == 0:
                print(
                    f"layers: {layers} fit {hbm:.0f} GiB for {', '.join(dispatchers)}", flush=True
                )
        configs = [
            run_config(args, world, d, layers, v)
            for d in dispatchers
            for v in (args.variants or [""])
        ]
    except ConfigError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    runs: list[dict] = []
    profiles: list[dict] = []
    out = Path(args.out)
    profile_out = Path(args.profile_out or out.with_name("e2e_profile.json"))
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    head = {
        "date": date.today().isoformat(),
        "machine": machine_name(device, world) if rank == 0 else "",
        "command": typed_command(sys.argv[1:] if argv is None else argv, world),
    }
    t_start = time.perf_counter()
    for cfg in configs:
        trainer = BenchTrainer(cfg)
        if rank == 0:
            print(f"[{time.perf_counter() - t_start:.0f} s] built {cfg.moe.dispatcher}, "
                  f"micro-batch {cfg.train.micro_batch}, capacity factor "
                  f"{cfg.moe.capacity_factor}", flush=True)  # fmt: skip
        with setup_frozen():  # as the trainer's loop does
            measured = measure(trainer, args)
        runs.append({**measured, "machine": head["machine"], "date": head["date"]})
        if rank == 0:  # written after every run: a later failure keeps the earlier ones
            print(json.dumps(runs[-1]), flush=True)
            doc = {**head, "peak_tflops": args.peak_tflops, "gemm_tflops": args.gemm_tflops}
            write_results(out, {**doc, "runs": runs}, args.append)
        if args.profile:
            from benchmarks.e2e_profile import print_profile, profile_step, write_profiles

            with setup_frozen():
                prof = profile_step(
                    trainer, rank == 0, args.trace, args.profile_micro_batches, args.profile_stack
                )
            if prof is not None:
                print_profile(prof)
                profiles.append(prof)
                write_profiles(profile_out, {**head, "profiles": profiles}, args.append)
        trainer.close()
        if rank == 0:
            print(f"[{time.perf_counter() - t_start:.0f} s] done", flush=True)
    if rank == 0:
        print_table(json.loads(out.read_text())["runs"])  # with the runs --append kept
        print(f"wrote {out}" + (f" and {profile_out}" if profiles else ""))
    close_distributed()  # every rank done before any exits (see its docstring)
    return 0


if __name__ == "__main__":
    sys.exit(main())
