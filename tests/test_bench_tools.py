"""The benchmark tools added for host-time and launch-config work, smoke-run on the CPU
(their figures come from the GPU machines; here: they run, cover every case, and write
what they promise)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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


def test_moe_layer_goal_lines():
    """The goal summary divides the right times: pft over the ceiling, the peers over pft,
    memory over the peers', _grouped_mm's time over Triton's, EP over the one-GPU run."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.moe_layer import goal_lines

    def case(impl, ms, b2b, peak, gpus=1):
        return {"gpus": gpus, "routing": "skewed", "impl": impl, "ms": ms,
                "ms_back_to_back": b2b, "peak_gib": peak}  # fmt: skip

    one = [
        case("pft", 8.0, 7.0, 2.0),
        case("ceiling", 6.4, 6.4, 4.0),
        case("torch_native", 12.0, 10.5, 3.0),
        case("deepspeed", 32.0, 28.0, 5.0),
        case("torch_grouped_mm", 6.0, 6.0, 4.0),
        case("triton_grouped_gemm", 7.5, 8.0, 4.0),
    ]
    lines = goal_lines(one)
    assert "skewed, 1 GPU(s): pft / ceiling 1.25x / 1.09x (goal <= 1.25x)" in lines
    assert "skewed, 1 GPU(s): torch_native / pft 1.50x / 1.50x (goal >= 1.5x)" in lines
    assert "skewed, 1 GPU(s): deepspeed / pft 4.00x / 4.00x (goal about 4x)" in lines
    assert "skewed, 1 GPU(s): pft's peak memory 0.50x ceiling's (goal <= 1.2x)" in lines
    assert "skewed, 1 GPU(s): pft's peak memory 0.40x deepspeed's (goal <= 0.6x)" in lines
    assert (
        "skewed: triton grouped GEMM at 0.80x / 0.75x of _grouped_mm's speed (goal >= 0.80x)"
        in lines
    )
    ep = goal_lines([case("pft", 10.0, 9.1, 2.0, gpus=2)], [{**one[0], "date": "2026-11-29"}])
    assert ep == [
        "skewed, EP = 2: pft / its one-GPU time 1.25x / 1.30x (goal <= 1.3x; one GPU measured 2026-11-29)"
    ]


def test_moe_layer_runs_and_prints_its_goals(tmp_path):
    out = tmp_path / "m.json"
    proc = _run(
        ["benchmarks/moe_layer.py", "--device", "cpu", "--tiny", "--quick", "--out", str(out),
         "--impls", "pft,torch_native,ceiling", "--routing", "balanced"],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert [c["impl"] for c in doc["cases"]] == ["pft", "torch_native", "ceiling"]
    goals = [ln for ln in proc.stdout.splitlines() if ln.startswith("goal: ")]
    # (no memory lines: a CPU run records no peak)
    assert len(goals) == 2 and "pft / ceiling" in goals[0] and "torch_native / pft" in goals[1]


def test_moe_layer_profile_runs_the_named_impl_on_the_named_routing(tmp_path):
    """`--profile torch_native` profiles the straightforward layer (torch's GELU and its
    backward), not pft's fused activation, on the first routing of `--routing`."""
    base = ["benchmarks/moe_layer.py", "--device", "cpu", "--tiny", "--quick"]
    native = _run(
        [*base, "--profile", "torch_native", "--routing", "skewed", "--out", "x"], tmp_path
    )
    assert native.returncode == 0, native.stderr[-2000:]
    assert "== torch_native, skewed: 3 steps, by kernel" in native.stdout
    assert "aten::gelu_backward" in native.stdout and "_ScaledAct" not in native.stdout
    pft = _run([*base, "--profile", "pft", "--out", "x"], tmp_path)
    assert pft.returncode == 0, pft.stderr[-2000:]
    assert "== pft, balanced: 3 steps, by kernel" in pft.stdout
    assert "_ScaledActBackward" in pft.stdout and "aten::gelu_backward" not in pft.stdout


def test_gpu_sampler_reads_clock_and_power_of_the_named_gpu(tmp_path, monkeypatch):
    """`GpuSampler` asks nvidia-smi for the named GPU and takes the medians of its lines,
    skipping the ones it cannot read; without a GPU id or without nvidia-smi: nothing."""
    from benchmarks.common import GpuSampler

    fake = tmp_path / "nvidia-smi"
    args = tmp_path / "args"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$@" > {args}\n'
        'printf "1500, 690.5\\n1800, 600.25\\n[N/A], [N/A]\\n1600, 700.0\\n"\n'
        "exec sleep 30\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with GpuSampler("GPU-1234", ms=20) as s:
        for _ in range(100):  # until the fake has printed
            if args.exists() and s.proc is not None:
                break
            time.sleep(0.05)
        time.sleep(0.3)
    assert args.read_text().split() == [
        "-i", "GPU-1234", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
        "-lms=20",
    ]  # fmt: skip
    assert s.samples == [(1500.0, 690.5), (1800.0, 600.25), (1600.0, 700.0)]
    assert s.medians() == {"sm_mhz": 1600.0, "power_w": 690.5}
    with GpuSampler(None) as off:
        pass
    assert off.proc is None and off.medians() == {}
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with GpuSampler("GPU-1234") as missing:
        pass
    assert missing.proc is None and missing.medians() == {}


def test_moe_layer_goal_lines_add_the_sustained_ratio():
    from benchmarks.moe_layer import goal_lines

    pft = {"gpus": 1, "routing": "balanced", "impl": "pft", "ms": 7.0, "ms_back_to_back": 7.0,
           "ms_sustained": 8.0}  # fmt: skip
    ceil = {**pft, "impl": "ceiling", "ms": 6.0, "ms_back_to_back": 6.4, "ms_sustained": 7.0}
    native = {
        **pft,
        "impl": "torch_native",
        "ms": 10.5,
        "ms_back_to_back": 10.5,
        "ms_sustained": 10.0,
    }
    lines = goal_lines([pft, ceil, native])
    assert lines[0] == "balanced, 1 GPU(s): pft / ceiling 1.17x / 1.09x / 1.14x (goal <= 1.25x)"
    assert lines[1] == "balanced, 1 GPU(s): torch_native / pft 1.50x / 1.50x / 1.25x (goal >= 1.5x)"
