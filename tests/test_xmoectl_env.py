"""`xmoectl env build|check`: rendered build scripts per site, and a real build of `local`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from xmoectl import envbuild, resource_dir
from xmoectl import sites as S


def xmoectl(*args: str, timeout: int = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xmoectl.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


@pytest.mark.parametrize(
    "site", ["frontier", "perlmutter", "dgx-a100", "h200", "local", "local-slurm"]
)
def test_build_script_renders_valid_bash(site, tmp_path):
    r = xmoectl("env", "build", "--site", site, "--prefix", str(tmp_path / "env"), "--dry-run")
    assert r.returncode == 0, r.stderr
    script, activate = r.stdout.split("# activate.sh", 1)
    activate = activate.split("\n", 1)[1]  # drop the "(PATH):" rest of the header line
    for text in (script, activate):
        f = tmp_path / "s.sh"
        f.write_text(text)
        assert subprocess.run(["bash", "-n", str(f)]).returncode == 0
    assert "DS_BUILD_OPS=0 pip_install --no-build-isolation -r" in script
    assert "pip_install --no-deps --no-build-isolation" in script
    assert not (tmp_path / "env").exists()  # a dry run builds nothing


def test_frontier_build_uses_conda_rocm_and_modules(tmp_path):
    p = envbuild.plan(S.load("frontier"), str(tmp_path / "e"))
    assert p.platform == "rocm"
    assert "module load PrgEnv-gnu rocm/6.3.1" in p.build_script
    assert 'conda create -y -p "$PREFIX/conda" python=3.11 pip' in p.build_script
    assert "--extra-index-url https://download.pytorch.org/whl/rocm6.3" in p.build_script
    assert f"-r {resource_dir('env').resolve() / 'rocm.txt'}" in p.build_script
    assert "export CC=gcc" in p.build_script
    assert f'export PATH={tmp_path / "e"}/conda/bin:"$PATH"' in p.activate_script
    assert "export FI_CXI_RDZV_PROTO=alt_read" in p.activate_script


def test_cpu_pins_never_allow_a_cuda_torch():
    text = (resource_dir("env") / "cpu.txt").read_text()
    assert "torch==2.13.0+cpu" in text and "triton==3.8.0" in text
    for platform in ("cpu", "cuda", "rocm"):
        lines = (resource_dir("env") / f"{platform}.txt").read_text().splitlines()
        torch_lines = [ln for ln in lines if ln.startswith("torch")]
        assert len(torch_lines) == 1 and "==" in torch_lines[0], platform


def test_missing_prefix_is_one_line(tmp_path):
    r = xmoectl("env", "build", "--site", "local", "--dry-run", cwd=tmp_path)
    assert r.returncode == 2 and "give --prefix DIR" in r.stderr and r.stderr.count("\n") == 1


def test_check_reports_red_for_an_unwritable_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(blocker / "sub"))
    results = {d["name"]: d for d in envbuild.check()}
    assert results["caches"]["ok"] is False and "TRITON_CACHE_DIR" in results["caches"]["detail"]
    assert results["torch"]["ok"] and results["deepspeed"]["ok"] and results["xmoe"]["ok"]
    assert results["triton"]["ok"], results["triton"]
    r = xmoectl("env", "check")
    assert r.returncode == 1 and "FAIL caches" in r.stdout


@pytest.mark.slow
def test_env_build_local_makes_a_working_environment(tmp_path):
    prefix = tmp_path / "xmoe-env"
    # the CPU wheels come from pip's configured sources here; no extra torch index needed
    r = xmoectl(
        "env",
        "build",
        "--site",
        "local",
        "--prefix",
        str(prefix),
        "--torch-index",
        "none",
        timeout=900,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert (prefix / "activate.sh").is_file() and (prefix / "build.sh").is_file()
    py = prefix / "venv" / "bin" / "python"
    versions = subprocess.run(
        ["bash", "-c", f"source {prefix}/activate.sh && python -c 'import torch, deepspeed, triton, xmoe; "
         "print(torch.__version__, triton.__version__, deepspeed.__version__)' && command -v python"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert versions.returncode == 0, versions.stderr
    first, where = versions.stdout.strip().split("\n")[-2:]  # DeepSpeed may log to stdout first
    assert first == "2.13.0+cpu 3.8.0 0.19.8"
    assert Path(where) == py
    check = xmoectl("env", "check", "--python", str(py), timeout=600)
    assert check.returncode == 0, check.stdout + check.stderr
    lines = check.stdout.strip().splitlines()
    names = [ln.split()[1] for ln in lines]
    assert names == ["torch", "devices", "comm", "triton", "caches", "deepspeed", "xmoe"]
    assert all(ln.startswith("ok") for ln in lines)
    assert "kernel interpreted on the CPU (TRITON_INTERPRET=1) gave the right sum" in check.stdout
