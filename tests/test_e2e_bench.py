"""The end-to-end benchmark on CPU: its numbers follow from what it trained, it trains what
the training loop trains, its layer choice is the planner's, its profile attributes backward
work to the forward module that caused it."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import e2e, e2e_profile  # noqa: E402
from tests.ep_spawn import free_port, run_ranks  # noqa: E402
from xmoe.config import load_config  # noqa: E402
from xmoe.flops import flops_per_token  # noqa: E402


def test_two_rank_run_writes_consistent_results(tmp_path):
    out = tmp_path / "res" / "e2e.json"
    out.parent.mkdir()
    # an earlier result of another size stays when --append merges
    earlier = {"dispatcher": "pft", "gpus": 8, "layers": 2, "tokens_per_s": 1.0,
               "tflops_per_gpu": 1.0, "mfu": 1e-3, "mfu_gemm": 1e-3, "peak_gib": 1.0,
               "step_s": 1.0, "dropped_fraction": 0.0}  # fmt: skip
    old = {"date": "x", "machine": "m", "command": "earlier", "runs": [earlier]}
    out.write_text(json.dumps(old))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
        f"--master-port={free_port()}", "benchmarks/e2e.py", "--device", "cpu", "--tiny",
        "--warmup", "1", "--steps", "2", "--profile", "--profile-micro-batches", "1", "--append", "--out", str(out),
        "--set", f"data.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert set(doc) >= {"date", "machine", "command", "runs"}
    assert doc["command"].startswith("earlier ; torchrun --nproc_per_node 2 benchmarks/e2e.py")
    assert str(tmp_path / "res") not in doc["command"] and "--out e2e.json" in doc["command"]
    runs = {(r["dispatcher"], r["gpus"]): r for r in doc["runs"]}
    assert set(runs) == {("pft", 8), ("pft", 2), ("deepspeed", 2)}
    for name in ("pft", "deepspeed"):
        r = runs[(name, 2)]
        cfg = load_config("small", e2e.TINY + [f"moe.dispatcher={name}", "parallel.ep=2"])
        assert r["layers"] == 2 and r["micro_batch"] == 2 and r["global_batch"] == 8
        # every timed step trains global_batch sequences of seq_len tokens
        tokens_per_step = r["global_batch"] * r["seq_len"]
        assert r["tokens_per_s"] * r["step_s"] == pytest.approx(tokens_per_step, rel=2e-3)
        tflops = flops_per_token(cfg, r["dropped_fraction"]) * r["tokens_per_s"] / 2 / 1e12
        assert r["tflops_per_gpu"] == pytest.approx(tflops, rel=2e-3)
        assert r["mfu"] == pytest.approx(r["tflops_per_gpu"] / 989.0, rel=2e-3)
        assert r["mfu_gemm"] == pytest.approx(r["tflops_per_gpu"] / 780.0, rel=2e-3)
        assert 0.0 < r["dropped_fraction"] < 0.5 and r["load_max_mean"] >= 1.0
        assert len(r["losses"]) == 3 and all(0 < v < 10 for v in r["losses"])  # warm-up + timed
    prof = json.loads((out.parent / "e2e_profile.json").read_text())
    assert [p["dispatcher"] for p in prof["profiles"]] == ["pft", "deepspeed"]
    for p in prof["profiles"]:
        cats = p["categories"]
        assert p["micro_batches"] == "1 of 2"  # one micro-batch and the update, of two
        for name, c in cats.items():
            once = name in ("optimizer", "grad_sync")
            assert c["step_ms"] == pytest.approx(c["ms"] * (1 if once else 2), abs=2e-3)
        assert list(cats) == list(e2e_profile.CATEGORIES)
        assert sum(c["percent"] for c in cats.values()) == pytest.approx(100.0, abs=0.1)
        for busy in ("attention", "expert_gemm", "all_to_all", "router", "optimizer"):
            assert cats[busy]["ms"] > 0, (p["dispatcher"], busy)
    assert "pft / deepspeed throughput on 2 ranks, 2 layers" in proc.stdout


def _bench_and_loop(rank: int, world: int, tmp: str) -> None:
    from xmoe.train.loop import train

    argv = ["--out", "x.json", "--device", "cpu", "--tiny", "--warmup", "1", "--steps", "2",
            "--set", f"data.cache_dir={tmp}/cache"]  # fmt: skip
    args = e2e.parse_args(argv)
    cfg = e2e.run_config(args, world, "pft", 0)
    trainer = e2e.BenchTrainer(cfg)
    e2e.measure(trainer, args)
    losses = torch.tensor(trainer.losses, dtype=torch.float64)
    alive = [weakref.ref(o) for o in (trainer.model, trainer.engine, trainer.engine.optimizer)]
    alive.append(weakref.ref(next(trainer.model.parameters())))
    trainer.close()
    # the next run starts from an empty device: nothing of this one is left (DeepSpeed's
    # hooks and the methods it binds to each parameter kept all of it alive before)
    assert [r() is None for r in alive] == [True] * 4, [type(r()).__name__ for r in alive]
    dist.all_reduce(losses)
    cfg.train.log_interval = 1
    records = train(cfg, Path(tmp) / "loop")
    assert gc.get_freeze_count() == 0  # the loop handed its frozen setup objects back
    if rank == 0:
        loop_losses = [r["loss"] for r in records]
        assert len(loop_losses) == 3
        assert loop_losses == pytest.approx((losses / world).tolist(), rel=1e-9, abs=1e-12)


def test_benchmark_trains_what_the_training_loop_trains(tmp_path):
    run_ranks(2, _bench_and_loop, str(tmp_path))


def test_layers_are_the_most_the_memory_model_fits():
    from dataclasses import replace

    from xmoectl import preflight
    from xmoectl import sites as S
    from xmoectl.costmodel import Assumptions, Layout, evaluate

    args = e2e.parse_args(["--out", "x.json"])
    assert e2e.fit_layers(args, 4, ["pft", "deepspeed"], 139.8) == 28  # the whole small preset
    a = Assumptions()
    hw = preflight.hardware(S.load("h200"), None, a, ranks_per_node=4)
    for hbm in (40.0, 60.0):
        hw_small = replace(hw, hbm_gib=hbm)
        layers = e2e.fit_layers(args, 4, ["pft", "deepspeed"], hbm)
        assert 1 <= layers < 28

        def fits(d: str, n: int, hw_small=hw_small) -> bool:
            cfg = e2e.run_config(args, 4, d, n)
            lay = Layout(ep=4, dispatcher=d, micro_batch=2, capacity_factor=1.25)
            return evaluate(cfg, lay, hw_small, 4, a).fits

        assert fits("pft", layers) and fits("deepspeed", layers)
        assert not (fits("pft", layers + 1) and fits("deepspeed", layers + 1))


def test_command_keeps_relative_paths_only():
    cmd = e2e.typed_command(["--out", "/somewhere/out/e2e.json", f"--trace={ROOT}/t.json"], 4)
    assert cmd == ("torchrun --nproc_per_node 4 benchmarks/e2e.py --out e2e.json --trace=t.json")


def test_profile_attributes_backward_to_the_forward_module():
    from torch.profiler import profile

    from xmoe.model import Transformer

    cfg = load_config("tiny", ["moe.dispatcher=pft"])
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 33))
    handles = e2e_profile.add_scopes(model)
    with profile() as prof:
        loss, _ = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
    for h in handles:
        h.remove()
    events = [e for e in prof.events() if e.name.startswith(e2e_profile.BACKWARD)]
    forward_of = e2e_profile.forward_categories(list(prof.events()))
    linked = {}
    for evt in events:
        cat = e2e_profile._category(evt, forward_of)
        linked.setdefault(evt.name.split(": ")[-1], set()).add(cat)
    # the same backward kernel (a matmul's) lands in different categories by where its
    # forward ran: only the autograd sequence numbers can tell them apart
    mm = set().union(*(cats for name, cats in linked.items() if name.startswith("MmBackward")))
    assert "attention" in mm and "router" not in mm, linked
    assert linked["_Fp32LogitsBackward"] == {"router"}, linked
    totals, _ = e2e_profile.categorise(list(prof.events()), on_device=False)
    for cat in ("attention", "expert_gemm", "router", "permute_combine", "other"):
        assert totals.get(cat, 0) > 0, (cat, totals)


def test_gap_report_charges_idle_time_to_the_late_launch(tmp_path):
    from benchmarks.common import gap_report

    def x(cat, name, ts, dur, **kw):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, **kw}

    events = [
        x("kernel", "gemm", 0, 10, args={"correlation": 1}),
        x("kernel", "gather", 30, 10, args={"correlation": 2}),  # 20 us idle before it
        x("kernel", "scan", 42, 5, args={"correlation": 3}),  # 2 us: under the threshold
        x("cuda_runtime", "cudaLaunchKernel", 25, 2, tid=1, args={"correlation": 2}),
        x("cpu_op", "xmoe::router", 0, 50, tid=1),
        x("cpu_op", "_Permute", 20, 10, tid=1),
        x("cpu_op", "aten::empty", 24, 4, tid=1),
        x("cpu_op", "elsewhere", 21, 10, tid=2),  # another thread: not the launcher
        # a Triton kernel, launched through the driver API from inside _Sum
        x("kernel", "_gather_rows_kernel", 60, 5, args={"correlation": 4}),
        x("cuda_driver", "cuLaunchKernelEx", 52, 2, tid=1, args={"correlation": 4}),
        x("cpu_op", "_Sum", 51, 5, tid=1),
    ]
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    report = gap_report(trace, 2, unit="micro-batch").splitlines()
    assert "kernels 0.015 ms/micro-batch, idle gaps >= 4 us 0.017 ms/micro-batch" in report[0]
    assert report[1:] == [
        "       10.0 us/micro-batch  x  0.5  _Permute -> gather",
        "        6.5 us/micro-batch  x  0.5  _Sum -> _gather_rows_kernel",
    ]


def test_gap_report_names_where_the_host_blocked(tmp_path):
    from benchmarks.common import gap_report

    def x(cat, name, ts, dur, **kw):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": 1, **kw}

    events = [
        x("kernel", "gemm", 0, 100, args={"correlation": 1}),
        x("python_function", "torch/nn/modules/module.py(1): _call_impl", 0, 300),
        x("python_function", "xmoe/train/loop.py(80): train_step", 5, 290),
        x("cpu_op", "aten::item", 10, 95),
        x("cpu_op", "aten::_local_scalar_dense", 11, 93),
        x("cuda_runtime", "cudaMemcpyAsync", 12, 90),  # waited for the gemm
        x("cuda_runtime", "cudaLaunchKernel", 120, 3, args={"correlation": 2}),
        x("cuda_runtime", "cudaStreamSynchronize", 130, 8),  # under the threshold
        x("cpu_op", "xmoe::optimizer", 140, 100),
        x("cuda_runtime", "cudaStreamSynchronize", 150, 40),
        x("cuda_runtime", "cudaStreamSynchronize", 200, 30),
        x("cuda_runtime", "cudaLaunchKernel", 400, 3),  # not a blocking call
    ]
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    report = gap_report(trace, 1).splitlines()
    at = report.index(
        "== host blocked in runtime calls >= 20 us: 0.160 ms/step; largest, by where they were made:"
    )
    assert report[at + 1 :] == [
        "       90.0 us/step  x  1.0  xmoe/train/loop.py(80): train_step aten::_local_scalar_dense cudaMemcpyAsync",
        "       70.0 us/step  x  2.0  xmoe/train/loop.py(80): train_step cudaStreamSynchronize",
    ]
