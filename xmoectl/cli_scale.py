"""`xmoectl scale-test`: scaling sweeps (run, status, report)."""

from __future__ import annotations

import sys

import click

from xmoectl import UserError
from xmoectl.cli_common import RUNS_DIR, Group


class _RunByDefault(Group):
    """`xmoectl scale-test --site S ...` is short for `xmoectl scale-test run --site S ...`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group("scale-test", cls=_RunByDefault)
def scale_test() -> None:
    """Scaling sweeps: a grid of runs over node counts and config values; status; report."""


@scale_test.command("run")
@click.option("--site", help="site profile name or YAML file")
@click.option("--model", help="preset name or config YAML [default: tiny]")
@click.option("--nodes", metavar="N1,N2,...", help="node counts, e.g. 1,2,4,8")
@click.option(
    "--weak/--strong", "weak", default=None, help="keep the per-GPU batch [default] or the global"
)
@click.option(
    "--vary", multiple=True, metavar="KEY=V1,V2", help="rbd=on,off, tp=1,2, or any section.key"
)
@click.option("--steps", type=click.IntRange(1), help="training steps per point")
@click.option("--set", "sets", multiple=True, metavar="SEC.KEY=VALUE", help="for every point")
@click.option("--time", help="wall time per point (default: the profile's)")
@click.option("--account")
@click.option("--partition")
@click.option("--qos")
@click.option("--tasks-per-node", metavar="T1,T2,...", help="ranks per node; a list scales GPUs")
@click.option("--env", help="environment built by `env build` (default: profile)")
@click.option("--hang-timeout", type=float, help="seconds without a step = hung [900; 0 = off]")
@click.option("--skip-invalid", is_flag=True, default=None, help="leave out points that cannot run")
@click.option("--name", help="sweep name (default: scale-<model>-<site>-<time>)")
@click.option("--runs-dir", default=None, help="parent of sweeps and runs")
@click.option("--resume", is_flag=True, help="resubmit the missing and failed points of --name")
@click.option("--dry-run", is_flag=True, help="show every job; write and submit nothing")
def scale_test_run(name, runs_dir, resume, dry_run, **grid) -> None:
    """Submit NODES x every --vary value, one run per point (a job array per job shape)."""
    from xmoectl import runs
    from xmoectl import sweep as SW
    from xmoectl import sweep_run as SR

    root = runs.runs_root(runs_dir)
    if resume:
        given = [k for k, v in grid.items() if v not in (None, ())]
        if not name or given:
            raise UserError(
                "--resume takes the sweep from --name and its grid from sweep.json"
                + (f"; drop --{given[0].replace('_', '-')}" if given else "")
            )
        SR.resume(SW.find(name, root), dry_run=dry_run, echo=click.echo)
        return
    spec = SW.make_spec(**grid)
    name = name or SW.default_name(spec["model"], spec["site"])
    sw = SR.start(spec, root, name, dry_run=dry_run, echo=click.echo)
    if sw is not None and any(
        s["final"] and s["final"]["state"] == "REFUSED" for s in sw.state().values()
    ):
        sys.exit(1)


@scale_test.command("status")
@click.argument("sweep")
@RUNS_DIR
def scale_test_status(sweep: str, runs_dir: str | None) -> None:
    """Each point of SWEEP: job, state, failure class, last metrics."""
    from xmoectl import report, runs
    from xmoectl import sweep as SW
    from xmoectl import sweep_run as SR

    sw = SW.find(sweep, runs.runs_root(runs_dir))
    click.echo(report.format_status(sw, SR.refresh(sw)), nl=False)


@scale_test.command("report")
@click.argument("sweep")
@click.option("--compare", "other", help="an earlier sweep: flag regressions against it")
@click.option("--threshold", type=float, default=0.05, show_default=True, help="noise, a fraction")
@RUNS_DIR
def scale_test_report(
    sweep: str, other: str | None, threshold: float, runs_dir: str | None
) -> None:
    """Table and plots of SWEEP (into its folder); with --compare, exit 1 on a regression."""
    from xmoectl import report, runs
    from xmoectl import sweep as SW
    from xmoectl import sweep_run as SR

    root = runs.runs_root(runs_dir)
    sw = SW.find(sweep, root)
    table = report.rows(sw.points, SR.refresh(sw))
    text, regressed = "", False
    if other:
        old = SW.find(other, root)
        changes = report.compare(table, report.rows(old.points, SR.refresh(old)), threshold)
        text = report.format_comparison(changes, old.name, threshold)
        regressed = any(c["regression"] for c in changes)
    click.echo(report.format_table(table), nl=False)
    for line in report.skipped_lines(sw.skipped):
        click.echo(line)
    for path in report.write(sw.dir, sw.name, table, text, sw.skipped):
        click.echo(f"wrote {path}")
    click.echo(text, nl=False)
    if regressed:
        sys.exit(1)
