"""What the `xmoectl` command modules share: the error-handling group and common options."""

from __future__ import annotations

import click

from xmoectl import UserError


class Group(click.Group):
    """Turns every user error (ours or xmoe.config's) into one line and exit status 2."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except ValueError as e:
            from xmoe.config import ConfigError

            if not isinstance(e, (UserError, ConfigError)):
                raise
            click.echo(f"xmoectl: error: {e}", err=True)
            ctx.exit(2)


RUNS_DIR = click.option("--runs-dir", default=None, help="parent of run directories")
