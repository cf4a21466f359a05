"""`python -m xmoe`: train a model, print a preset's size, prepare data.

A thin click layer: every command calls plain functions (`xmoe.train.loop.train`,
`xmoe.flops`) and turns user mistakes (ConfigError and its subclasses) into one line
on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import click

from xmoe.config import Config, ConfigError, load_config

EXIT_USAGE = 2


def _one_line_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_USAGE)

    return wrapper


@click.group()
def main() -> None:
    """xmoe: DeepSeek-style Mixture-of-Experts training (PFT, RBD, SSMB) on DeepSpeed."""


def default_run_dir(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.preset or 'custom'}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_dir(run_dir: Path, resume: bool, force: bool) -> None:
    """Refuse to mix a new run into one that already logged metrics or saved checkpoints.

    With --force the earlier run's metrics and checkpoints are moved aside (rank 0 only,
    before the ranks meet), never deleted: a later --resume must not pick up its checkpoints.
    """
    import os

    metrics = run_dir / "metrics.jsonl"
    ckpts = run_dir / "checkpoints"
    held = [p for p in (metrics, ckpts) if p.exists()]
    if not held or resume:
        return
    if not force:
        raise ConfigError(
            f"run directory {run_dir} already holds a run ({', '.join(p.name for p in held)}): "
            "pass --resume to continue it, --force to start over in it, or another --run-dir"
        )
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
        aside = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir(exist_ok=True)
        for p in held:
            p.rename(aside / p.name)
        click.echo(
            f"--force: the earlier run's {' and '.join(p.name for p in held)} moved to {aside}"
        )


@main.command()
@click.option(
    "--config",
    "config_name",
    default="tiny",
    show_default=True,
    help="Preset name (tiny, small, medium, large, super) or a YAML file.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SEC.KEY=VALUE",
    help="Override one config value; repeatable (e.g. --set moe.top_k=4).",
)
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where metrics, config and checkpoints go [default: runs/<preset>-<time>].",
)
@click.option("--resume", is_flag=True, help="Continue from the run directory's latest checkpoint.")
@click.option(
    "--force", is_flag=True, help="Start over in a run directory that already has metrics."
)
@click.option(
    "--peak-tflops",
    type=float,
    default=None,
    help="Peak TFLOP/s per device for MFU (else config, $XMOE_PEAK_TFLOPS, datasheet).",
)
@click.option(
    "--stop-after",
    type=click.IntRange(1),
    default=None,
    help="Stop after this many global steps; the LR schedule still spans train.steps.",
)
@_one_line_errors
def train(config_name, overrides, run_dir, resume, force, peak_tflops, stop_after) -> None:
    """Train a model with DeepSpeed on this process's share of the ranks."""
    cfg = load_config(config_name, list(overrides))
    if run_dir is None:
        if resume:
            raise ConfigError("--resume needs --run-dir (the directory of the run to continue)")
        run_dir = _shared_default_run_dir(cfg)
    check_run_dir(run_dir, resume, force)
    from xmoe.parallel.topology import close_distributed
    from xmoe.train.loop import train as run_training
    from xmoe.train.reliability import StopTraining

    try:
        run_training(cfg, run_dir, resume=resume, peak_tflops=peak_tflops, stop_after=stop_after)
    except StopTraining:
        close_distributed(barrier=False)  # the ranks stop together, after the checkpoint
        raise
    close_distributed()


def _shared_default_run_dir(cfg: Config) -> Path:
    # Several ranks must agree on one directory: the job id names it when there is one.
    import os

    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
    if (
        job
        and job != "none"
        and int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1))) > 1
    ):
        return Path("runs") / f"{cfg.preset or 'custom'}-job{job}"
    if int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1))) > 1:
        raise ConfigError("several ranks need one run directory: pass --run-dir DIR")
    return default_run_dir(cfg)


@main.command()
@click.option(
    "--config", "config_name", default="tiny", show_default=True, help="Preset name or YAML file."
)
@click.option("--set", "overrides", multiple=True, metavar="SEC.KEY=VALUE")
@_one_line_errors
def info(config_name, overrides) -> None:
    """Print parameter counts and training FLOPs per token of a model shape."""
    from xmoe.flops import flops_breakdown, flops_per_token, param_counts

    cfg = load_config(config_name, list(overrides))
    m, e = cfg.model, cfg.moe
    counts = param_counts(cfg)
    click.echo(
        f"model {cfg.preset or config_name}: {m.layers} layers ({m.dense_layers} dense), "
        f"hidden {m.hidden}, heads {m.heads}, seq {m.seq_len}, vocab {m.vocab_size}"
    )
    click.echo(
        f"experts: {e.num_experts} routed ({e.activation}, width {e.expert_hidden}), "
        f"top-{e.top_k}, {e.num_shared_experts} shared"
    )
    click.echo(f"total parameters:     {_human(counts['total'])} ({counts['total']:,})")
    click.echo(f"activated parameters: {_human(counts['activated'])} ({counts['activated']:,})")
    for key in (
        "embedding",
        "lm_head",
        "attention",
        "dense_mlp",
        "router",
        "routed_experts",
        "shared_experts",
        "norms",
    ):
        click.echo(f"  {key:<16} {counts[key]:>18,}")
    fwd = flops_breakdown(cfg)
    click.echo(f"training FLOPs/token: {flops_per_token(cfg) / 1e9:.3f} GFLOP (3 x forward)")
    for key, value in fwd.items():
        click.echo(f"  {key:<16} {value / 1e9:>12.4f} GFLOP forward")


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _mount_data_commands() -> None:
    try:
        from xmoe.data.cli import data
    except ImportError:
        return
    main.add_command(data)


_mount_data_commands()
