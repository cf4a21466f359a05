"""Shell quoting for the jinja2 templates: every value reaching a script is made inert.

Templates may only print values that went through one of the filters below; `finalize`
refuses anything else, so a forgotten filter fails at render time instead of producing a
script that runs someone's `$(...)`.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

import jinja2

from xmoectl import UserError, resource_dir

_VAR_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_OPTION = re.compile(r"[A-Za-z][A-Za-z0-9_-]*\Z")


class Quoted(str):
    """Text already safe to paste into a shell script."""


def quote(value: Any) -> Quoted:
    """One shell word holding exactly `value`; nothing in it is expanded."""
    return Quoted(shlex.quote(str(value)))


def quote_expand(value: Any) -> Quoted:
    """One shell word in which only `${NAME}` references are expanded.

    Profiles need `${USER}` or `${SLURM_JOB_ID}` in paths; every other character, including
    `$(...)`, backticks and bare `$NAME`, stays literal.
    """
    text, parts, pos = str(value), [], 0
    for m in _VAR_REF.finditer(text):
        if m.start() > pos:
            parts.append(shlex.quote(text[pos : m.start()]))
        parts.append('"${' + m.group(1) + '}"')
        pos = m.end()
    if pos < len(text) or not parts:
        parts.append(shlex.quote(text[pos:]))
    return Quoted("".join(parts))


def ident(value: Any) -> Quoted:
    """An environment variable name (validated, printed bare)."""
    if not _IDENT.match(str(value)):
        raise UserError(f"{value!r} is not a valid environment variable name")
    return Quoted(str(value))


def number(value: Any) -> Quoted:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"expected a number, got {value!r}")
    return Quoted(str(value))


def sbatch_line(key: str, value: Any) -> Quoted:
    """`#SBATCH --key=value` (or `--key` for a flag); sbatch reads shell-style quotes."""
    if not _OPTION.match(key):
        raise UserError(f"sbatch option {key!r} is not a valid option name")
    if value is True:
        return Quoted(f"#SBATCH --{key}")
    text = str(value)
    if any(ord(c) < 32 for c in text):
        raise UserError(f"sbatch option --{key} must be one line, got {text!r}")
    return Quoted(f"#SBATCH --{key}={shlex.quote(text)}")


def _finalize(value: Any) -> Any:
    if isinstance(value, Quoted):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    raise UserError(f"template printed an unquoted value {value!r}: pass it through |q or |qx")


_ENV: jinja2.Environment | None = None


def environment() -> jinja2.Environment:
    """The one jinja2 environment of xmoectl, loading from the bundled `templates/`."""
    global _ENV
    if _ENV is None:
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(resource_dir("templates"))),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
            finalize=_finalize,
        )
        env.filters.update(q=quote, qx=quote_expand, ident=ident, num=number)
        env.globals["sbatch_line"] = sbatch_line
        _ENV = env
    return _ENV


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)
