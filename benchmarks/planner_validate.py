"""The planner's predictions against the real trainer: peak memory and step time per layout.

For each layout of a reduced small-preset shape (hidden 2048, 64 GELU experts of 1408,
top-6, seq 2048, vocab 50304, 8 layers by default), one torchrun of the real trainer
(`xmoe.train.loop.train`: DeepSpeed engine, bf16, PFT dispatcher, synthetic data) measures
the peak allocated memory of every rank (the maximum is kept) and the steady-state step
time; `xmoectl.costmodel` predicts both for the same layout with the `h200` site profile
(or its preflight figures, when filed). In the result file, the cases of the section
`h200_validation.<N>gpu` are replaced layout by layout; other sections (e.g.
`frontier_paper_cases`) are kept.

  python benchmarks/planner_validate.py --gpus 4 --out benchmarks/results/planner.json
  python benchmarks/planner_validate.py --gpus 2                # when the 4-GPU machine is away
  python benchmarks/planner_validate.py --gpus 4 --only 0 1 2    # a subset; later runs add up
  python benchmarks/planner_validate.py --cpu --gpus 2 --tiny --out /tmp/p.json  # smoke test

On the CPU the "peak" is the process's resident set, not comparable with the prediction:
the smoke test checks the plumbing only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xmoe.config import load_config  # noqa: E402
from xmoectl import plan_report, planner, preflight  # noqa: E402
from xmoectl import sites as S  # noqa: E402
from xmoectl.costmodel import Assumptions, Layout, evaluate  # noqa: E402


def shape_overrides(args: argparse.Namespace) -> list[str]:
    if args.tiny:
        return [
            "model.hidden=64", "model.heads=4", "model.vocab_size=320", "model.seq_len=64",
            f"model.layers={args.layers}", "moe.num_experts=8", "moe.top_k=2",
            "moe.expert_hidden=32",
        ]  # fmt: skip
    return [f"model.layers={args.layers}"]


def layouts_for(gpus: int) -> list[Layout]:
    """A spread of what the planner trades: EP, micro-batch, ZeRO, checkpointing, capacity."""
    g = gpus
    out = [
        Layout(ep=g, micro_batch=1),
        Layout(ep=g, micro_batch=2),
        Layout(ep=g, micro_batch=4, checkpointing=True, zero_stage=2),
        Layout(ep=g, micro_batch=2, capacity_factor=1.25),
        Layout(ep=g, micro_batch=8),
    ]
    if g > 1:
        out.append(Layout(ep=1, micro_batch=1))
    if g >= 4:
        out.append(Layout(ep=g // 2, micro_batch=2))
    return out


def config_for(args: argparse.Namespace, lay: Layout) -> list[str]:
    return [
        *shape_overrides(args),
        *lay.overrides(),
        "moe.dispatcher=pft",
        f"train.global_batch={args.gpus * 8}",
        f"train.steps={args.steps}",
        f"train.log_interval={max(1, args.steps // 2)}",
        "train.warmup_steps=1",
    ]


# --------------------------------------------------------------------------- worker (one rank)


def worker(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from xmoe.parallel.topology import close_distributed
    from xmoe.train.loop import train

    cfg = load_config("small", json.loads(args.overrides))
    records = train(cfg, Path(args.run_dir))
    device = (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    )
    if device is not None:
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t = torch.tensor([peak], dtype=torch.float64, device=device or "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        last = records[-1]
        Path(args.result).write_text(
            json.dumps(
                {
                    "peak_gib": round(float(t.item()), 3),
                    "rank0_peak_gib": round(peak, 3),
                    "step_s": last["step_time_s"],
                    "tokens_per_s": last["tokens_per_s"],
                    "tflops_per_gpu": last["tflops_per_gpu"],
                    "expert_load_max_mean": last["expert_load_max_mean"],
                    "dropped_fraction": last["dropped_fraction"],
                }
            )
        )
    close_distributed()
    return 0


# --------------------------------------------------------------------------- driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args: argparse.Namespace, lay: Layout, work: Path) -> dict:
    result = work / f"{lay.label().replace(' ', '_')}.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.gpus}",
        f"--master-port={free_port()}", str(Path(__file__).resolve()), "--worker",
        "--overrides", json.dumps(config_for(args, lay)), "--result", str(result),
        "--run-dir", str(work / f"run-{lay.label().replace(' ', '_')}"),
    ]  # fmt: skip
    path = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    env.setdefault("TRITON_CACHE_DIR", str(work / "triton-cache"))
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["OMP_NUM_THREADS"] = "1"
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode or not result.is_file():
        text = proc.stdout[-4000:] + proc.stderr
        oom = "out of memory" in text.lower()
        first = text.find("Traceback (most recent call last)")  # the worker's, not torchrun's
        tail = text[first : first + 1500] if first >= 0 else text[-1500:]
        return {"error": "OOM" if oom else f"exit {proc.returncode}", "tail": tail}
    data = json.loads(result.read_text())
    data["wall_s"] = round(time.time() - t0, 1)
    return data


def predict(args: argparse.Namespace, lay: Layout, hw, a: Assumptions) -> dict:
    cfg = load_config("small", config_for(args, lay))
    world = args.gpus
    out = {}
    for name, imb in (("", a.imbalance), ("_balanced", 1.0)):
        est = evaluate(cfg, lay, hw, world, replace(a, imbalance=imb))
        out[f"peak_gib{name}"] = round(est.peak_gib, 3)
        out[f"needed_gib{name}"] = round(est.needed_gib, 3)
    out["step_s"] = round(est.time["step"], 5)
    out["memory_gib"] = {k: round(v, 3) for k, v in est.memory.items()}
    return out


def ranking(cases: list[dict]) -> dict:
    ok = [c for c in cases if "error" not in c["measured"]]
    if len(ok) < 2:
        return {}
    best_measured = min(ok, key=lambda c: c["measured"]["step_s"])
    best_predicted = min(ok, key=lambda c: c["predicted"]["step_s"])
    order_m = sorted(range(len(ok)), key=lambda i: ok[i]["measured"]["step_s"])
    order_p = sorted(range(len(ok)), key=lambda i: ok[i]["predicted"]["step_s"])
    rank_m = {i: r for r, i in enumerate(order_m)}
    rank_p = {i: r for r, i in enumerate(order_p)}
    n = len(ok)
    spearman = 1 - 6 * sum((rank_m[i] - rank_p[i]) ** 2 for i in range(n)) / (n * (n * n - 1))
    return {
        "measured_best": best_measured["layout"],
        "predicted_best": best_predicted["layout"],
        "predicted_best_time_over_measured_best": round(
            best_predicted["measured"]["step_s"] / best_measured["measured"]["step_s"], 4
        ),
        "spearman": round(spearman, 3),
        "goal": "the predicted best within 10% of the measured best",
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", type=int, default=4)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--tiny", action="store_true", help="tiny shape (CPU smoke test)")
    p.add_argument("--cpu", action="store_true", help="gloo ranks on the CPU (smoke test)")
    p.add_argument("--only", type=int, nargs="*", help="indices of the layouts to run")
    p.add_argument("--timeout", type=int, default=480, help="seconds per layout")
    p.add_argument("--site", default="h200")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "planner.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--overrides", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument(
        "--frontier-only", action="store_true", help="only the paper's Frontier cases (no GPU)"
    )
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.frontier_only:
        write_section(Path(args.out), "frontier_paper_cases", frontier_cases())
        print(f"wrote {args.out}")
        return 0

    site = S.load(args.site)
    found = preflight.load_measured(site)
    a = Assumptions()
    hw = preflight.hardware(site, found[0] if found else None, a, ranks_per_node=args.gpus)
    lays = layouts_for(args.gpus)
    if args.only:
        lays = [lays[i] for i in args.only]

    def write(cases: list[dict]) -> None:  # after every layout: a timeout keeps the earlier ones
        key = f"{args.gpus}gpu{f'-{args.layers}layers' if args.layers != 8 else ''}"
        key += "-cpu-smoke" if args.cpu else ""
        cases = merged_cases(Path(args.out), key, cases)
        write_section(
            Path(args.out),
            "h200_validation",
            {
                key: {
                    "date": date.today().isoformat(),
                    "command": " ".join(sys.argv),
                    "site": site.name,
                    "hardware": asdict(hw),
                    "measured_file": found[1] if found else "",
                    "shape": shape_overrides(args) + ["(preset small)"],
                    "global_batch": args.gpus * 8,
                    "cases": cases,
                    "ranking": ranking(cases),
                    "memory_goal": "predicted peak within 15% of the measured peak",
                }
            },
        )

    cases = []
    with tempfile.TemporaryDirectory(prefix="planner-validate-") as tmp:
        for lay in lays:
            measured = measure(args, lay, Path(tmp))
            pred = predict(args, lay, hw, a)
            case = {
                "layout": lay.label(),
                "overrides": lay.overrides(),
                "measured": measured,
                "predicted": pred,
            }
            if "peak_gib" in measured and measured["peak_gib"]:
                case["memory_error"] = round(pred["peak_gib"] / measured["peak_gib"] - 1, 4)
                case["memory_error_balanced"] = round(
                    pred["peak_gib_balanced"] / measured["peak_gib"] - 1, 4
                )
            print(
                json.dumps(
                    {k: v for k, v in case.items() if k != "predicted"}
                    | {"predicted_peak": pred["peak_gib"]}
                ),
                flush=True,
            )
            cases.append(case)
            write(cases)

    print(f"wrote {args.out}")
    return 0


def merged_cases(out: Path, key: str, cases: list[dict]) -> list[dict]:
    """Earlier cases of the same section stay unless this run measured the same layout
    (so `--only` runs split over several calls add up)."""
    if not out.is_file():
        return cases
    old = json.loads(out.read_text()).get("h200_validation", {}).get(key, {}).get("cases", [])
    labels = {c["layout"] for c in cases}
    return [c for c in old if c["layout"] not in labels] + cases


def write_section(out: Path, name: str, value: dict) -> None:
    """Replace `name` (merging one level down) in the result file, keeping the rest."""
    doc = json.loads(out.read_text()) if out.is_file() else {}
    if isinstance(doc.get(name), dict) and name == "h200_validation":
        doc[name].update(value)
    else:
        doc[name] = value
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")


# X-MoE's published Frontier runs on 256 GCDs (32 nodes): preset -> (TP, EP, TFLOP/s per GCD)
PAPER = {"small": (1, 8, 44.0), "medium": (1, 64, 24.2), "large": (2, 64, 24.1)}


def frontier_cases() -> dict:
    """The planner's choice for the paper's three cases beside the layout the paper used."""
    site = S.load("frontier")
    cases = {}
    for model, (tp, ep, tflops) in PAPER.items():
        cfg = load_config(model)
        plan = planner.make_plan(cfg, site, 32, use_measured=False, model_name=model)
        paper = plan_report.config_estimate(plan)
        chosen = plan.chosen
        cases[model] = {
            "paper_layout": f"TP{tp} EP{ep}",
            "paper_tflops_per_gcd": tflops,
            "paper_layout_prediction": paper[1].to_dict() if paper else plan.config_problem,
            "paper_layout_rank": paper[0] if paper else None,
            "chosen": chosen.to_dict() if chosen else None,
            "feasible_layouts": len(plan.feasible),
            "rejected_layouts": len(plan.rejected),
        }
    return {
        "date": date.today().isoformat(),
        "command": "python benchmarks/planner_validate.py --frontier-only",
        "site": "frontier (datasheet figures)",
        "nodes": 32,
        "cases": cases,
    }


if __name__ == "__main__":
    sys.exit(main())
