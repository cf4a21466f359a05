"""docs/CONFIG.md lists every config key once, with the default the code has."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from xmoe.config import Config

DOC = Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"


def _shown(value) -> str:
    """A default as the reference writes it (YAML spelling)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[]" if not value else repr(value)
    if value == "":
        return '""'
    return str(value)


def _code_defaults() -> dict[str, str]:
    out = {}
    for section in dataclasses.fields(Config):
        if section.name == "preset":  # a name, not a section
            continue
        obj = getattr(Config(), section.name)
        for f in dataclasses.fields(obj):
            out[f"{section.name}.{f.name}"] = _shown(getattr(obj, f.name))
    return out


def _documented() -> dict[str, str]:
    rows = re.findall(r"^\| `([a-z_]+\.[a-z_0-9]+)` \| `([^`]*)` \|", DOC.read_text(), re.M)
    keys = [k for k, _ in rows]
    assert len(keys) == len(set(keys)), "a key is listed twice"
    return dict(rows)


def test_every_key_is_documented_with_its_default():
    code, doc = _code_defaults(), _documented()
    assert sorted(code) == sorted(doc), (
        f"missing: {sorted(set(code) - set(doc))}, unknown: {sorted(set(doc) - set(code))}"
    )
    wrong = {k: (doc[k], code[k]) for k in code if doc[k] != code[k]}
    assert not wrong, f"documented default != code (doc, code): {wrong}"
