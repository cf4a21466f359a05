"""The SSMB benchmark's CPU smoke run: it runs under torchrun, writes its JSON, and the
MoE block's saved activations shrink by TP under SSMB and not under plain TP."""

import json
import subprocess
import sys

import pytest
from helpers import REPO, _env, free_port


@pytest.mark.timeout(240)
def test_ssmb_benchmark_smoke(tmp_path):
    out = tmp_path / "ssmb.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "benchmarks/ssmb.py",
        "--device",
        "cpu",
        "--tiny",
        "--warmup",
        "1",
        "--iters",
        "1",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert {"date", "machine", "command", "cases"} <= set(doc)
    cases = {(c["tp"], c["mode"]): c for c in doc["cases"]}
    assert set(cases) == {(1, "ssmb"), (2, "ssmb"), (2, "plain")}
    assert cases[(2, "ssmb")]["moe_tokens_per_rank"] * 2 == cases[(1, "ssmb")]["global_tokens"]
    assert cases[(2, "ssmb")]["moe_act_vs_ideal"] <= 1.10
    assert cases[(2, "plain")]["moe_act_vs_ideal"] >= 1.8
    assert all(c["block_ms"] > 0 for c in doc["cases"])
