"""A plain (non-editable) install carries the templates, site profiles and pinned env sets."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_ships_resources_and_an_install_finds_them(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT), "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = tmp_path.glob("xmoe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("templates", "site_profiles", "env"):
        for f in (ROOT / folder).iterdir():
            assert f"xmoectl/_bundled/{folder}/{f.name}" in names
    # install it away from the source tree and use it from there
    target = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = "import xmoectl; print(xmoectl.__file__); print(xmoectl.resource_dir('templates'))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    where, templates = out.stdout.split()
    assert where.startswith(str(target)) and templates == str(
        target / "xmoectl" / "_bundled" / "templates"
    )
    r = subprocess.run(
        [sys.executable, "-m", "xmoectl.cli", "render", "--site", "frontier", "--nodes", "1", "--dry-run",
         "--set", "train.micro_batch=1"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "--gpu-bind=closest" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "xmoectl.cli", "sites", "list"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert str(target / "xmoectl" / "_bundled" / "site_profiles" / "frontier.yaml") in r.stdout
