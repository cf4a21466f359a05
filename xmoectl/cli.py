"""The `xmoectl` command line: a thin click layer over sites, render, runs, slurm and envbuild.
`plan` and `preflight` live in `cli_plan`, `scale-test` in `cli_scale`.

Imports stay inside the commands so that `--help`, `sites`, `render --dry-run` and `status`
answer in well under a second on a login node. Bad input is one line on stderr, exit 2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from xmoectl import UserError, cli_plan, cli_scale
from xmoectl.cli_common import RUNS_DIR, Group


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="xmoe", prog_name="xmoectl")
def main() -> None:
    """Build a site's environment, submit xmoe training runs and follow them."""


# --------------------------------------------------------------------------- sites


@main.group()
def sites() -> None:
    """Site profiles: list, show, validate."""


@sites.command("list")
def sites_list() -> None:
    """Every site on the search path and the file that defines it."""
    from xmoectl import sites as S

    for name, path in sorted(S.available().items()):
        try:
            desc = S.load(str(path)).description
        except UserError as e:
            desc = click.style(f"invalid: {e}", fg="red")
        click.echo(f"{name:<12} {desc}  [{path}]")


@sites.command("show")
@click.argument("name")
def sites_show(name: str) -> None:
    """The resolved profile of NAME, as YAML."""
    import yaml

    from xmoectl import sites as S

    prof = S.load(name)
    click.echo(f"# {prof.source}")
    click.echo(yaml.safe_dump(prof.to_dict(), sort_keys=False), nl=False)


@sites.command("validate")
@click.argument("files", nargs=-1, required=True)
def sites_validate(files: tuple[str, ...]) -> None:
    """Check profile FILES against the schema."""
    from xmoectl import sites as S

    for f in files:
        prof = S.load(f)
        click.echo(f"{f}: ok (site {prof.name}, {prof.scheduler}, {prof.launcher})")


# --------------------------------------------------------------------------- env


@main.group()
def env() -> None:
    """Build and check a site's Python environment."""


@env.command("build")
@click.option("--site", required=True, help="site profile name or YAML file")
@click.option("--prefix", help="where the environment goes (default: the profile's python.prefix)")
@click.option(
    "--torch-index", help="override the profile's torch wheel index ('none': no extra index)"
)
@click.option(
    "--xmoe-source", help="xmoe to install: source tree or wheel (default: this checkout)"
)
@click.option("--dry-run", is_flag=True, help="print the build script, run nothing")
def env_build(
    site: str, prefix: str | None, torch_index: str | None, xmoe_source: str | None, dry_run: bool
) -> None:
    """Build the site's environment: torch, Triton, DeepSpeed (DS_BUILD_OPS=0), xmoe, activate.sh."""
    from xmoectl import envbuild
    from xmoectl import sites as S

    p = envbuild.plan(S.load(site), prefix, torch_index=torch_index, xmoe_source=xmoe_source)
    if dry_run:
        click.echo(p.build_script, nl=False)
        click.echo(f"# activate.sh ({p.prefix}/activate.sh):")
        click.echo(p.activate_script, nl=False)
        return
    rc = envbuild.build(p)
    if rc:
        click.echo(
            f"xmoectl: env build failed (status {rc}); the script is {p.prefix}/build.sh", err=True
        )
        sys.exit(1)
    click.echo(f"environment ready: source {p.prefix}/activate.sh")


@env.command("check")
@click.option("--python", "python", help="the environment's python (default: this one)")
@click.option("--site", help="site profile: expect its network plugin when it has NICs and GPUs")
def env_check(python: str | None, site: str | None) -> None:
    """One line per check, green or red: torch, devices, comm plugin, Triton, caches, DeepSpeed."""
    from xmoectl import envbuild
    from xmoectl import sites as S

    expect = False
    if site:
        prof = S.load(site)
        expect = prof.node.gpus > 0 and prof.node.nics > 0
    results = envbuild.check(python, expect_plugin=expect)
    for r in results:
        mark = click.style("ok  ", fg="green") if r["ok"] else click.style("FAIL", fg="red")
        click.echo(f"{mark} {r['name']:<12} {r['detail']}")
    if not all(r["ok"] for r in results):
        sys.exit(1)


# --------------------------------------------------------------------------- render / submit


def _job_options(f):
    opts = [
        click.option(
            "--site", default="local", show_default=True, help="site profile name or YAML file"
        ),
        click.option(
            "--model", default="tiny", show_default=True, help="preset name or config YAML"
        ),
        click.option("--nodes", default=1, show_default=True, type=int),
        click.option(
            "--set", "sets", multiple=True, metavar="SEC.KEY=VALUE", help="config override"
        ),
        click.option("--time", default="", help="wall time (default: the profile's)"),
        click.option("--account", default="", help="Slurm account (default: the profile's)"),
        click.option("--partition", default="", help="Slurm partition"),
        click.option("--qos", default="", help="Slurm QOS"),
        click.option(
            "--tasks-per-node", default=0, type=int, help="ranks per node (default: the profile's)"
        ),
        click.option("--name", default="", help="run name (default: <model>-<site>-<time>)"),
        click.option(
            "--runs-dir",
            default=None,
            help="parent of run directories (default: $XMOE_RUNS or ./runs)",
        ),
        click.option(
            "--env",
            "env_prefix",
            default=None,
            help="environment built by `env build` (default: profile)",
        ),
        click.option(
            "--resume", is_flag=True, help="continue the run NAME from its last checkpoint"
        ),
        click.option("--force", is_flag=True, help="reuse an existing run directory"),
        click.option(
            "--dry-run", is_flag=True, help="print the job script; write and submit nothing"
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _prepare(kw: dict) -> tuple:
    from xmoectl import render, runs
    from xmoectl import sites as S

    site = S.load(kw["site"])
    root = runs.runs_root(kw["runs_dir"])
    name = runs.check_name(kw["name"] or runs.default_name(kw["model"], site.name))
    run_dir = root / name
    if not kw["dry_run"]:
        runs.claim(run_dir, force=kw["force"], resume=kw["resume"])
    job = render.resolve(
        site,
        kw["model"],
        kw["nodes"],
        run_dir,
        overrides=kw["sets"],
        time=kw["time"],
        account=kw["account"],
        partition=kw["partition"],
        qos=kw["qos"],
        tasks_per_node=kw["tasks_per_node"],
        env_prefix=kw["env_prefix"],
        resume=kw["resume"],
        force=kw["force"],
    )
    return job, render.render_script(job)


def _echo_plan(job) -> None:
    from xmoectl.planner import LAYOUT_FIELDS

    if job.plan and job.plan.get("chosen"):
        c = job.plan["chosen"]
        fixed = len(job.plan.get("fixed") or {})
        how = "as you fixed it" if fixed == len(LAYOUT_FIELDS) else "planned"
        click.echo(
            f"layout:        {c['label']} ({how}: {c['memory_gib']['needed']:.1f} GiB, "
            f"{c['time_s']['step']:.3g} s/step predicted; plan.json)"
        )
    elif job.plan:
        click.echo("layout:        as you fixed it; predicted NOT to fit (plan.json)", err=True)


@main.command()
@_job_options
def render(**kw) -> None:
    """Write a run directory (config, job script, manifest) without submitting it."""
    from xmoectl import runs

    job, script = _prepare(kw)
    if kw["dry_run"]:
        click.echo(script, nl=False)
        return
    runs.write_run(job, script)
    click.echo(f"run directory: {job.run_dir}")
    _echo_plan(job)
    click.echo(f"job script:    {job.run_dir / job.script_name}")


@main.command()
@_job_options
@click.option("--follow/--no-follow", default=None, help="follow the log (default: on for local)")
def submit(follow: bool | None, **kw) -> None:
    """Render a run and submit it (Slurm through submitit; `local` runs here and is followed)."""
    from xmoectl import local, runs, slurm
    from xmoectl import render as R

    job, script = _prepare(kw)
    if kw["dry_run"]:
        click.echo(script, nl=False)
        return
    fresh = not job.run_dir.exists()
    runs.write_run(job, script)
    click.echo(f"run directory: {job.run_dir}")
    _echo_plan(job)
    try:
        if job.site.scheduler == "local":
            job_id = local.start(job.run_dir, job.script_name)
        else:
            job_id = slurm.submit(job, R.sbatch_options(job))
    except UserError:
        if fresh:  # nothing was submitted: leave no half-made run behind
            import shutil

            shutil.rmtree(job.run_dir, ignore_errors=True)
        raise
    runs.update_manifest(
        job.run_dir, job_id=job_id, submitted=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    )
    click.echo(f"job id:        {job_id}")
    if follow is None:
        follow = job.site.scheduler == "local"
    if follow:
        state = _follow(job.run_dir, job_id, job.site.scheduler)
        click.echo(
            f"{job.run_dir.name}: {state}  {runs.format_metrics(runs.last_metrics(job.run_dir))}"
        )
        if state != "COMPLETED":
            sys.exit(1)


# --------------------------------------------------------------------------- runs


def _state(run_dir: Path, manifest: dict) -> dict[str, str]:
    job_id = manifest.get("job_id")
    if not job_id:
        return {"state": "NOT SUBMITTED", "elapsed": ""}
    if manifest.get("scheduler") == "local":
        from xmoectl import local

        return local.job_state(run_dir, str(job_id))
    from xmoectl import slurm

    return slurm.job_state(str(job_id))


def _log_files(run_dir: Path, manifest: dict) -> list[Path]:
    if manifest.get("scheduler") == "local":
        from xmoectl import local

        p = run_dir / local.LOG
        return [p] if p.is_file() else []
    from xmoectl import slurm

    return slurm.log_files(run_dir, manifest.get("job_id"))


def _follow(run_dir: Path, job_id: str, scheduler: str) -> str:
    from xmoectl import runs

    if scheduler == "local":
        from xmoectl import local

        return local.follow(run_dir, job_id)
    manifest = runs.read_manifest(run_dir)
    offsets: dict[Path, int] = {}
    while True:
        state = _state(run_dir, manifest)["state"]
        for p in _log_files(run_dir, manifest):
            with p.open("rb") as f:
                f.seek(offsets.get(p, 0))
                chunk = f.read()
                offsets[p] = f.tell()
            if chunk:
                click.echo(chunk.decode(errors="replace"), nl=False)
        from xmoectl.slurm import TERMINAL

        if state in TERMINAL:
            return state
        time.sleep(1.0)


@main.command()
@click.argument("run", required=False)
@RUNS_DIR
def status(run: str | None, runs_dir: str | None) -> None:
    """State (squeue/sacct), elapsed time and the last metrics line of RUN (default: newest)."""
    from xmoectl import runs

    d = runs.find_run(run, runs.runs_root(runs_dir))
    m = runs.read_manifest(d)
    st = _state(d, m)
    click.echo(f"run:     {d}")
    click.echo(f"site:    {m.get('site')}  nodes={m.get('nodes')} ranks={m.get('world_size')}")
    reason = f"  ({st['reason']})" if st.get("reason") and st["state"] == "PENDING" else ""
    job_id = m.get("job_id") or "-"
    click.echo(f"job:     {job_id}  {st['state']}  elapsed {st.get('elapsed') or '-'}{reason}")
    click.echo(f"metrics: {runs.format_metrics(runs.last_metrics(d))}")


@main.command()
@click.argument("run", required=False)
@click.option("-f", "--follow", is_flag=True, help="keep printing until the job ends")
@RUNS_DIR
def logs(run: str | None, follow: bool, runs_dir: str | None) -> None:
    """The job log of RUN (default: newest)."""
    from xmoectl import runs

    d = runs.find_run(run, runs.runs_root(runs_dir))
    m = runs.read_manifest(d)
    if follow and m.get("job_id"):
        _follow(d, str(m["job_id"]), m.get("scheduler", "slurm"))
        return
    files = _log_files(d, m)
    if not files:
        raise UserError(f"{d.name}: no log yet (job {m.get('job_id') or 'not submitted'})")
    for p in files:
        click.echo(p.read_text(errors="replace"), nl=False)


@main.command()
@click.argument("run", required=False)
@RUNS_DIR
def cancel(run: str | None, runs_dir: str | None) -> None:
    """Cancel the job of RUN (scancel, or stop the local process group)."""
    from xmoectl import runs

    d = runs.find_run(run, runs.runs_root(runs_dir))
    m = runs.read_manifest(d)
    job_id = m.get("job_id")
    if not job_id:
        raise UserError(f"{d.name} was never submitted")
    if m.get("scheduler") == "local":
        from xmoectl import local

        local.cancel(d, str(job_id))
    else:
        from xmoectl import slurm

        slurm.cancel(str(job_id))
    click.echo(f"cancelled {d.name} (job {job_id})")


@main.command("runs")
@RUNS_DIR
def runs_cmd(runs_dir: str | None) -> None:
    """Every run under the runs directory: name, site, job, state, last metrics."""
    from xmoectl import runs

    root = runs.runs_root(runs_dir)
    found = runs.all_runs(root)
    if not found:
        click.echo(f"no runs under {root}")
        return
    for d in found:
        try:
            m = runs.read_manifest(d)
        except UserError as e:
            click.echo(f"{d.name}: {e}")
            continue
        st = _state(d, m)["state"]
        line = f"{d.name:<40} {m.get('site', '?'):<12} {m.get('job_id') or '-':<14} {st:<13}"
        click.echo(f"{line} {runs.format_metrics(runs.last_metrics(d))}")


# --------------------------------------------------------------------------- plan, preflight, scale-test

main.add_command(cli_plan.plan)
main.add_command(cli_plan.preflight)
main.add_command(cli_scale.scale_test)


if __name__ == "__main__":  # pragma: no cover
    main()
