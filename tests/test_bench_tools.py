"""The benchmark tools added for host-time and launch-config work, smoke-run on the CPU
(their figures come from the GPU machines; here: they run, cover every case, and write
what they promise)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_host_overhead_times_every_case(tmp_path):
    out = tmp_path / "host.json"
    proc = _run(
        ["benchmarks/host_overhead.py", "--device", "cpu", "--calls", "3", "--out", str(out)],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    names = [c["case"] for c in doc["cases"]]
    assert names[0] == "aten add_ (yardstick)" and "MoE layer fwd+bwd" in names
    assert "routing_metadata" in names and "softmax_topk fwd" in names
    assert all(c["host_us_per_call"] > 0 for c in doc["cases"])
    assert doc["command"].startswith("python benchmarks/host_overhead.py --device cpu")


def test_sweep_act_times_each_config_and_names_the_best(tmp_path):
    proc = _run(
        ["benchmarks/moe_layer.py", "--device", "cpu", "--tiny", "--out", str(tmp_path / "m.json"),
         "--sweep-act", "16,128,4;32,64,8"],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{'config'")]
    assert len(lines) == 2 and all("fwd_ms" in ln and "bwd_ms" in ln for ln in lines)
    best = [ln for ln in proc.stdout.splitlines() if ln.startswith("best XMOE_ACT_CONFIG=")]
    fwd, bwd = best[0].split("=", 1)[1].split(";")
    assert {fwd, bwd} <= {"16,128,4", "32,64,8"}


def test_act_config_override_and_widths():
    from xmoe.kernels.activation import GPU_CONFIG, act_config

    assert act_config(1408, True) == GPU_CONFIG
    (fr, _, fw), (br, _, bw) = GPU_CONFIG
    assert act_config(40, True) == ((fr, 64, fw), (br, 64, bw))  # no block wider than the row
    os.environ["XMOE_ACT_CONFIG"] = "8,256,8;4,512,4"
    try:
        assert act_config(4096, True) == ((8, 256, 8), (4, 512, 4))
        assert act_config(4096, False)[0][1] == 128  # the interpreter keeps its small blocks
    finally:
        del os.environ["XMOE_ACT_CONFIG"]
