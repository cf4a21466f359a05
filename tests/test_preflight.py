"""Preflight: the measuring program on real gloo ranks, its plugin check, filing the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port, xmoectl

from xmoe.config import load_config
from xmoectl import UserError, planner
from xmoectl import preflight as P
from xmoectl import sites as S


def torchrun(nproc: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}", "-m", "xmoe.tools.preflight", *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_measures_two_virtual_nodes(tmp_path):
    out = tmp_path / "pf.json"
    r = torchrun(2, "--out", str(out), "--node-size", "1", "--iters", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert (res["nodes"], res["gpus_per_node"], res["world"]) == (2, 1, 2)
    assert res["backend"] == "gloo" and res["device"] == "cpu"
    assert res["gemm_tflops"] > 0 and res["gemm_tflops_min"] <= res["gemm_tflops"]
    assert res["intra_node"]["ranks"] == 1 and "all_to_all_gbs" not in res["intra_node"]
    inter = res["inter_node"]
    assert inter["ranks"] == 2 and inter["all_to_all_gbs"] > 0 and inter["all_reduce_busbw_gbs"] > 0
    assert res["plugin"] == {"needed": False, "loaded": False, "libraries": []}
    assert [b["rank"] for b in res["binding"]] == [0, 1] and res["binding_ok"]
    assert all(set(b["cores"]) <= set(os.sched_getaffinity(0)) for b in res["binding"])
    assert P.failure(res) == ""


def test_missing_plugin_fails_fast_and_is_not_filed(tmp_path):
    out = tmp_path / "pf.json"
    r = subprocess.run(
        [sys.executable, "-m", "xmoe.tools.preflight", "--out", str(out), "--expect-plugin"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 3, r.stderr[-2000:]
    assert "network plugin not loaded" in r.stderr
    res = json.loads(out.read_text())
    assert res["plugin"]["needed"] and not res["plugin"]["loaded"]
    assert "gemm_tflops" not in res and "binding" not in res  # stopped before measuring
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    r = xmoectl("preflight", "--site", "frontier", "--from", str(out), env=env)
    assert r.returncode == 1 and "preflight failed: network plugin not loaded" in r.stderr
    assert not (tmp_path / "cfg").exists()


def test_local_site_end_to_end_files_the_figures(tmp_path):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "OMP_NUM_THREADS": "1"}
    r = xmoectl("preflight", "--site", "local", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    dest = tmp_path / "cfg" / "xmoe" / "site_profiles" / "local.measured.json"
    assert f"measured figures: {dest}" in r.stdout and "GEMM" in r.stdout
    data = json.loads(dest.read_text())
    assert data["site"] == "local" and data["world"] == 1 and data["gemm_tflops"] > 0


def gpu_site(tmp_path: Path) -> Path:
    d = tmp_path / "site_profiles"
    d.mkdir()
    text = Path(S.load("frontier").source).read_text().replace("name: frontier", "name: lab")
    (d / "lab.yaml").write_text(text)
    return d


def test_result_filed_beside_a_user_profile_is_used_by_the_planner(tmp_path, monkeypatch):
    gpu_site(tmp_path)
    monkeypatch.chdir(tmp_path)
    site = S.load("lab")
    result = {
        "schema": 1, "nodes": 2, "gpus_per_node": 8, "world": 16, "device": "AMD MI250X",
        "backend": "nccl", "gemm_tflops": 120.0, "gemm_tflops_min": 118.0, "hbm_gib": 63.98,
        "copy_tbs": 1.3, "plugin": {"needed": True, "loaded": True, "libraries": ["/x/librccl-net.so"]},
        "intra_node": {"ranks": 8, "all_to_all_gbs": 60.0, "all_reduce_busbw_gbs": 80.0},
        "inter_node": {"ranks": 16, "all_to_all_gbs": 9.5, "all_reduce_busbw_gbs": 70.0},
        "binding_ok": True, "problems": [],
    }  # fmt: skip
    dest = P.record(site, result)
    assert dest == tmp_path / "site_profiles" / "lab.measured.json"
    hw = planner.make_plan(load_config("small"), site, 2).hardware
    assert hw.source == "measured"
    assert (hw.gemm_tflops, hw.hbm_gib, hw.intra_gbs, hw.inter_gbs) == (120.0, 63.98, 60.0, 9.5)
    assert (hw.allreduce_intra_gbs, hw.node_nic_gbs, hw.hbm_tbs) == (80.0, 70.0, 1.3)
    lines = "\n".join(P.summary(result))
    assert "GEMM 120 TFLOP/s" in lines and "network plugin: loaded /x/librccl-net.so" in lines


def test_bundled_profiles_file_into_the_user_config(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.chdir(tmp_path)
    assert P.target(S.load("frontier")) == tmp_path / "cfg" / "xmoe" / "site_profiles" / (
        "frontier.measured.json"
    )


def test_script_for_a_slurm_site(tmp_path):
    site = S.load("frontier")
    two = P.script(site, 2, tmp_path / "o.json", python="/env/bin/python")
    assert (
        "srun --nodes=2 --ntasks=16 --ntasks-per-node=8 --cpus-per-task=7 --gpus-per-task=1 "
        "--gpu-bind=closest" in two
    )
    assert f"-m xmoe.tools.preflight --out {tmp_path}/o.json --expect-plugin\n" in two
    assert "module load PrgEnv-gnu" in two and "export MASTER_PORT=3442" in two
    one = P.script(site, 1, tmp_path / "o.json", python="/env/bin/python")
    assert "--expect-plugin" not in one  # nothing crosses nodes
    f = tmp_path / "s.sh"
    f.write_text(two)
    assert subprocess.run(["bash", "-n", str(f)]).returncode == 0


def test_slurm_site_outside_an_allocation_is_refused(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(UserError, match="inside an allocation"):
        P.run(S.load("frontier"), 2)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--site", "local", "--nodes", "2"], "use --nodes 1"),
        (["--site", "frontier", "--nodes", "0", "--dry-run"], "--nodes 0 must be >= 1"),
        (["--site", "frontier", "--from", "/nonexistent.json"], "not a readable preflight result"),
    ],
)
def test_bad_input_one_line_exit_2(args, message, tmp_path):
    r = xmoectl("preflight", *args, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and r.stderr.count("\n") == 1


def test_pci_address_from_device_properties():
    from types import SimpleNamespace

    from xmoe.tools.preflight import pci_address

    props = SimpleNamespace(pci_domain_id=0, pci_bus_id=0x1B, pci_device_id=0)
    assert pci_address(props) == "0000:1b:00.0"
    assert pci_address(SimpleNamespace(name="cpu")) == ""
