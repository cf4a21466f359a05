"""`xmoectl plan` and `xmoectl preflight`: choose the parallel layout, measure the site."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command()
@click.option("--site", required=True, help="site profile name or YAML file")
@click.option("--model", default="tiny", show_default=True, help="preset name or config YAML")
@click.option("--nodes", default=1, show_default=True, type=int)
@click.option("--seq-len", type=int, default=None, help="sequence length (default: the model's)")
@click.option(
    "--global-batch", type=int, default=None, help="sequences per step (default: the model's)"
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="SEC.KEY=VALUE",
    help="config override; layout fields set here stay fixed",
)
@click.option(
    "--dispatchers", default="pft,rbd", show_default=True, help="pft, rbd, padded, deepspeed"
)
@click.option(
    "--imbalance",
    type=float,
    default=None,
    help="busiest GPU's routed rows over the mean (default 1.5)",
)
@click.option("--top", default=10, show_default=True, type=int, help="rows per table")
@click.option("--all", "show_all", is_flag=True, help="list every layout")
@click.option("--datasheet", is_flag=True, help="ignore figures measured by `xmoectl preflight`")
@click.option("--json", "as_json", is_flag=True, help="the whole plan as JSON")
def plan(
    site,
    model,
    nodes,
    seq_len,
    global_batch,
    sets,
    dispatchers,
    imbalance,
    top,
    show_all,
    datasheet,
    as_json,
) -> None:
    """Rank MODEL's parallel layouts on NODES nodes of SITE by predicted memory and step time."""
    from xmoectl import plan_report, planner
    from xmoectl import sites as S

    p = planner.plan_from_cli(
        S.load(site), model, nodes, sets, seq_len=seq_len, global_batch=global_batch,
        dispatchers=dispatchers, imbalance=imbalance, use_measured=not datasheet,
    )  # fmt: skip
    text = plan_report.plan_json(p) if as_json else plan_report.format_plan(p, top, show_all)
    click.echo(text, nl=False)
    if not p.chosen:
        raise planner.PlanError(p.no_fit_message())


@click.command()
@click.option("--site", required=True, help="site profile name or YAML file")
@click.option(
    "--nodes", default=1, show_default=True, type=int, help="nodes of the allocation to use"
)
@click.option(
    "--tasks-per-node", default=0, type=int, help="ranks per node (default: the profile's)"
)
@click.option(
    "--env", "env_prefix", default=None, help="environment built by `env build` (default: profile)"
)
@click.option(
    "--from", "from_file", default=None, help="file the JSON of a preflight run made elsewhere"
)
@click.option(
    "--out",
    default=None,
    help="where the figures go (default: beside your profile, or ~/.config/xmoe)",
)
@click.option("--dry-run", is_flag=True, help="print the measuring script, run nothing")
def preflight(site, nodes, tasks_per_node, env_prefix, from_file, out, dry_run) -> None:
    """Measure GEMM rate, collectives and binding inside an allocation; the planner uses them."""
    from xmoectl import preflight as P
    from xmoectl import sites as S
    from xmoectl.render import env_paths

    prof = S.load(site)
    if from_file:
        result = P.read_result(from_file)
    else:
        python, bindir = env_paths(prof, prof.python.prefix if env_prefix is None else env_prefix)
        kw = dict(python=python, bindir=bindir, tasks_per_node=tasks_per_node)
        if dry_run:
            click.echo(P.script(prof, nodes, Path("preflight.json"), **kw), nl=False)
            return
        result = P.run(prof, nodes, **kw)
    for line in P.summary(result):
        click.echo(line)
    why = P.failure(result)
    if why:
        click.echo(f"xmoectl: preflight failed: {why}", err=True)
        sys.exit(1)
    dest = P.record(prof, result, Path(out) if out else None)
    click.echo(f"measured figures: {dest} (`xmoectl plan --site {prof.name}` uses them)")
