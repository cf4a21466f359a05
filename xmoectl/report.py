"""What a sweep measured: a table, PNG plots and a comparison against an earlier sweep.

Per point the steady-state figures of its `metrics.jsonl` (the median over the logged
windows after the first, which holds start-up and warm-up), the layout it ran, and its
scaling efficiency: tokens/s per GPU against the smallest successful point of the same
series (the same --vary settings). The same formula serves weak scaling (per-GPU work
held, so the ideal is 1.0) and strong scaling (global work held; per-GPU throughput still
ideally constant). matplotlib is imported only to draw, with the Agg backend: no display.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

DEFAULT_THRESHOLD = 0.05  # run-to-run noise of tokens/s and memory on a quiet cluster
PLOTS = ("throughput.png", "efficiency.png", "memory.png")


def summarize(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Steady-state figures of one run's metric records (None without any)."""
    rows = [r for r in records if _num(r.get("tokens_per_s")) is not None]
    if not rows:
        return None
    steady = rows[1:] if len(rows) > 1 else rows

    def median(key: str) -> float | None:
        vals = [v for v in (_num(r.get(key)) for r in steady) if v is not None]
        return statistics.median(vals) if vals else None

    mems = [v for v in (_num(r.get("peak_mem_gib")) for r in rows) if v is not None]
    return {
        "steps": rows[-1].get("step"),
        "windows": len(steady),
        "tokens_per_s": median("tokens_per_s"),
        "tflops_per_gpu": median("tflops_per_gpu"),
        "mfu": median("mfu"),
        "step_time_s": median("step_time_s"),
        "peak_mem_gib": max(mems) if mems else None,
        "loss": _num(rows[-1].get("loss")),
        "skipped_steps": sum(int(r.get("skipped_steps") or 0) for r in rows),
    }


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def layout_label(layout: dict[str, Any]) -> str:
    text = f"tp{layout['tp']} ep{layout['ep']} dp{layout['dp']} {layout['dispatcher']}"
    if layout["tp"] > 1 and layout.get("ssmb"):
        text += " ssmb"
    return text + f" mb{layout['micro_batch']}"


def rows(points: list[dict[str, Any]], state: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per point: its layout, result and figures, efficiency within its series."""
    out = []
    for p in points:
        s = state.get(p["name"], {})
        final = s.get("final") or {}
        live = s.get("live")
        summary = final.get("summary") if final.get("class") == "ok" else None
        if final:
            result, detail = final["class"], final.get("detail", "")
        elif live is not None:
            result, detail = f"{live.cls}?", live.detail
        else:
            result, detail = (s.get("state") or "NOT SUBMITTED").lower(), ""
        out.append(
            {
                "point": p["name"], "series": p["series"], "nodes": p["nodes"],
                "gpus": p["world_size"], "layout": layout_label(p["layout"]),
                "global_batch": p["layout"]["global_batch"], "job_id": s.get("job_id"),
                "result": result, "detail": detail, **(summary or {}), "efficiency": None,
            }
        )  # fmt: skip
    for series in {r["series"] for r in out}:
        members = sorted(
            (r for r in out if r["series"] == series), key=lambda r: (r["gpus"], r["nodes"])
        )
        base = next((r for r in members if r.get("tokens_per_s")), None)
        if base is None:
            continue
        per_gpu0 = base["tokens_per_s"] / base["gpus"]
        for r in members:
            if r.get("tokens_per_s"):
                r["efficiency"] = (r["tokens_per_s"] / r["gpus"]) / per_gpu0
                r["baseline"] = base["point"]
    return out


def _fmt(v: Any, spec: str, scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, spec)


COLUMNS = (
    ("point", "point"), ("nodes", "nodes"), ("GPUs", "gpus"), ("layout", "layout"),
    ("batch", "global_batch"), ("tokens/s", "tokens_per_s"), ("TFLOP/s/GPU", "tflops_per_gpu"),
    ("MFU", "mfu"), ("peak GiB", "peak_mem_gib"), ("efficiency", "efficiency"),
    ("result", "result"),
)  # fmt: skip


def _cells(r: dict[str, Any]) -> list[str]:
    return [
        r["point"], str(r["nodes"]), str(r["gpus"]), r["layout"], str(r["global_batch"]),
        _fmt(r.get("tokens_per_s"), ".0f"), _fmt(r.get("tflops_per_gpu"), ".3g"),
        _fmt(r.get("mfu"), ".1f", 100) + ("%" if r.get("mfu") is not None else ""),
        _fmt(r.get("peak_mem_gib"), ".2f"), _fmt(r.get("efficiency"), ".2f"),
        r["result"] + (f" ({r['detail']})" if r["detail"] and r["result"] != "ok" else ""),
    ]  # fmt: skip


def format_table(table: list[dict[str, Any]], markdown: bool = False) -> str:
    head = [h for h, _ in COLUMNS]
    body = [_cells(r) for r in table]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        return "\n".join(lines) + "\n"
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    widths[-1] = 0  # the result column runs to the end of the line
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), *map(fmt, body)]) + "\n"


def plot(out_dir: Path, table: list[dict[str, Any]], title: str) -> list[Path]:
    """throughput.png, efficiency.png and memory.png against nodes (or GPUs), a line per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = sorted({r["series"] for r in table})
    # scaling inside a node (--tasks-per-node 1,2,4,8) is drawn against GPUs
    xkey = "gpus" if len({r["gpus"] / r["nodes"] for r in table}) > 1 else "nodes"
    specs = (
        ("throughput.png", "tokens_per_s", "tokens/s (all GPUs)"),
        ("efficiency.png", "efficiency", "scaling efficiency (per-GPU tokens/s vs smallest)"),
        ("memory.png", "peak_mem_gib", "peak memory per GPU (GiB)"),
    )
    paths = []
    for fname, key, ylabel in specs:
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
        for s in series:
            pts = sorted(
                (r[xkey], r[key]) for r in table if r["series"] == s and r.get(key) is not None
            )
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=s or "all points")
        if key == "efficiency":
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
            ax.set_ylim(bottom=0)
        xs = sorted({r[xkey] for r in table})
        if len(xs) > 1 and xs[-1] / xs[0] >= 4:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.set_xlabel("GPUs (ranks)" if xkey == "gpus" else "nodes")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if len(series) > 1 and ax.get_lines():
            ax.legend(fontsize="small")
        fig.tight_layout()
        path = Path(out_dir) / fname
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def compare(
    table: list[dict[str, Any]], other: list[dict[str, Any]], threshold: float = DEFAULT_THRESHOLD
) -> list[dict[str, Any]]:
    """Point-by-point changes against an earlier sweep (matched by series, nodes and GPUs).

    A regression is tokens/s lower, or peak memory higher, by more than `threshold` (a
    fraction), or a point that succeeded before and fails now.
    """
    before = {(r["series"], r["nodes"], r["gpus"]): r for r in other}
    out = []
    for r in table:
        old = before.get((r["series"], r["nodes"], r["gpus"]))
        if old is None:
            continue
        if (old["result"] == "ok") != (r["result"] == "ok"):
            out.append(
                {"point": r["point"], "metric": "result", "old": old["result"], "new": r["result"],
                 "change": None, "regression": old["result"] == "ok"}
            )  # fmt: skip
            continue
        for metric, worse in (("tokens_per_s", -1), ("peak_mem_gib", +1)):
            a, b = old.get(metric), r.get(metric)
            if not a or b is None:
                continue
            change = b / a - 1
            out.append(
                {"point": r["point"], "metric": metric, "old": a, "new": b, "change": change,
                 "regression": change * worse > threshold}
            )  # fmt: skip
    return out


def format_comparison(changes: list[dict[str, Any]], other: str, threshold: float) -> str:
    lines = [f"against {other} (noise threshold {100 * threshold:.0f}%):"]
    if not changes:
        lines.append("  nothing to compare: no point of the same series and size measured in both")
    for c in changes:
        mark = "REGRESSION" if c["regression"] else "ok"
        if c["change"] is None:
            lines.append(f"  {mark:<10} {c['point']}: {c['old']} -> {c['new']}")
        else:
            lines.append(
                f"  {mark:<10} {c['point']}: {c['metric']} {c['old']:.4g} -> {c['new']:.4g} "
                f"({100 * c['change']:+.1f}%)"
            )
    return "\n".join(lines) + "\n"


def write(
    out_dir: Path,
    name: str,
    table: list[dict[str, Any]],
    comparison: str = "",
    skipped: list[dict[str, Any]] | None = None,
) -> list[Path]:
    """report.md, report.json and the plots, into the sweep folder."""
    out_dir = Path(out_dir)
    md = f"# Scale test {name}\n\n" + format_table(table, markdown=True)
    md += "".join(f"\n{line}\n" for line in skipped_lines(skipped or []))
    md += "".join(f"\n![{p[:-4]}]({p})\n" for p in PLOTS)
    if comparison:
        md += "\n```\n" + comparison + "```\n"
    (out_dir / "report.md").write_text(md)
    (out_dir / "report.json").write_text(json.dumps(table, indent=1, default=str) + "\n")
    return [out_dir / "report.md", out_dir / "report.json", *plot(out_dir, table, name)]


def format_status(sweep: Any, state: dict[str, dict[str, Any]]) -> str:
    """One line per point of a sweep: job, scheduler state, result class, progress."""
    from collections import Counter

    from xmoectl import runs

    spec = sweep.spec
    lines = [
        f"sweep {sweep.dir}: site {spec['site']}, model {spec['model']}, {spec['mode']} scaling, "
        f"{len(sweep.points)} points"
    ]
    counts: Counter[str] = Counter()
    table = [("point", "nodes", "job", "state", "result", "")]
    for p in sweep.points:
        s = state[p["name"]]
        final, live = s.get("final"), s.get("live")
        if final:
            result, detail = final["class"], final.get("detail", "")
        elif live is not None:
            result, detail = f"{live.cls}?", live.detail
        else:
            result, detail = "-", ""
        progress = runs.format_metrics(runs.last_metrics(sweep.point_dir(p["name"])))
        if result == "ok" or not detail:
            detail = progress
        counts[result if final else s.get("state", "?").lower()] += 1
        table.append(
            (
                p["name"],
                str(p["nodes"]),
                s.get("job_id") or "-",
                s.get("state", "?"),
                result,
                detail,
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    for row in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[5])
    lines.append(", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    lines += skipped_lines(sweep.skipped)
    return "\n".join(line.rstrip() for line in lines) + "\n"


def skipped_lines(skipped: list[dict[str, Any]]) -> list[str]:
    """The points `--skip-invalid` left out of the sweep, and why."""
    return [f"skipped {sk['name']}: {sk['reason']}" for sk in skipped]
