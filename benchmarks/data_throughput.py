"""Data pipeline throughput on CPU: preprocessing MB/s by worker count, and batch fetch time
against a training step of the tiny preset.

    python benchmarks/data_throughput.py --mb 16 --workers 1,2 --repeat 3

The input is the shipped corpus's generator run with more documents (JSONL, ~`--mb` MB);
tokenizers: the byte tokenizer and a GPT-2-style byte-level BPE (8k merges learned from the
shipped corpus with the `tokenizers` package, loaded back through `gpt2:DIR`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from xmoe.data.preprocess import preprocess
from xmoe.data.storygen import CORPUS_FILE, corpus_lines


def make_input(path: Path, megabytes: float) -> int:
    with open(path, "w", encoding="utf-8") as fh:
        seed, size = 0, 0
        while size < megabytes * 1e6:
            chunk = corpus_lines(seed=seed, count=2000)
            fh.write(chunk)
            size += len(chunk.encode("utf-8"))
            seed += 1
    return path.stat().st_size


def train_bpe(folder: Path, vocab_size: int = 8192) -> str:
    import tokenizers as tk

    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [json.loads(line)["text"] for line in CORPUS_FILE.read_text().splitlines()]
    tok.train_from_iterator(texts, trainer)
    tok.model.save(str(folder))
    return f"gpt2:{folder}"


def bench_preprocess(src: Path, out: Path, tokenizer: str, workers: int, repeat: int) -> dict:
    # Best of `repeat`: on a shared machine the fastest run is the least disturbed one.
    runs = [
        preprocess([str(src)], str(out), tokenizer=tokenizer, workers=workers, force=True)
        for _ in range(repeat)
    ]
    stats = min(runs, key=lambda r: r.seconds)
    return {
        "tokenizer": tokenizer.split(":")[0],
        "workers": workers,
        "MB": round(stats.bytes_read / 1e6, 1),
        "seconds": round(stats.seconds, 2),
        "MB/s": round(stats.mb_per_s, 2),
        "tokens/s": round(stats.tokens / stats.seconds),
    }


def bench_fetch_vs_step(prefix: Path, cache: Path, steps: int) -> dict:
    import torch

    from xmoe.config import load_config
    from xmoe.data import build_train_data
    from xmoe.model import Transformer

    cfg = load_config(
        "tiny", ["data.source=indexed", f"data.path={prefix}", f"data.cache_dir={cache}"]
    )
    t0 = time.perf_counter()
    data = build_train_data(cfg, 0, 1)
    index_s = time.perf_counter() - t0
    fetch = []
    for _ in range(200):
        t0 = time.perf_counter()
        data.next_batch()
        fetch.append(time.perf_counter() - t0)
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    step = []
    for _ in range(steps + 1):
        batch = data.next_batch()
        t0 = time.perf_counter()
        loss, _ = model.loss(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step.append(time.perf_counter() - t0)
    fetch_ms = statistics.median(fetch) * 1e3
    step_ms = statistics.median(step[1:]) * 1e3
    return {
        "index_build_s": round(index_s, 2),
        "batch": f"{cfg.train.micro_batch}x{cfg.model.seq_len + 1}",
        "fetch_ms": round(fetch_ms, 3),
        "step_ms": round(step_ms, 1),
        "fetch_share_%": round(100 * fetch_ms / step_ms, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=32.0, help="input size in MB")
    ap.add_argument("--workers", default="1,2", help="worker counts to time")
    ap.add_argument("--steps", type=int, default=5, help="tiny-preset training steps to time")
    ap.add_argument("--no-bpe", action="store_true", help="time the byte tokenizer only")
    ap.add_argument("--repeat", type=int, default=1, help="report the best of this many runs")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        src = tmp / "input.jsonl"
        size = make_input(src, args.mb)
        print(
            f"input: {size / 1e6:.1f} MB JSONL; machine: {platform.machine()}, "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
        )
        specs = ["byte"]
        if not args.no_bpe:
            (tmp / "bpe").mkdir()
            specs.append(train_bpe(tmp / "bpe"))
        rows = []
        for spec in specs:
            for w in (int(x) for x in args.workers.split(",")):
                rows.append(bench_preprocess(src, tmp / "out", spec, w, args.repeat))
                print(rows[-1], flush=True)
        preprocess([str(src)], str(tmp / "byte"), tokenizer="byte", workers=1, force=True)
        fetch = bench_fetch_vs_step(tmp / "byte", tmp / "cache", args.steps)
        print(fetch)
        print("\n| tokenizer | workers | MB | s | MB/s | tokens/s |\n|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['tokenizer']} | {r['workers']} | {r['MB']} | {r['seconds']} | "
                f"{r['MB/s']} | {r['tokens/s']} |"
            )
        if args.json:
            Path(args.json).write_text(json.dumps({"preprocess": rows, "fetch": fetch}, indent=2))


if __name__ == "__main__":
    main()
