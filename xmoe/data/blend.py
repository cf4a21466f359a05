"""Megatron `--data-path` blends and `--split` weights, turned into one sample source.

`["prefix"]`, `["w1", "p1", "w2", "p2", ...]` or `["p1", "p2"]` (equal weights). Each
dataset's documents are split into train/valid/test ranges by the split weights (Megatron's
rounding), and the blend interleaves the datasets' samples in proportion to their weights:
dataset k's j-th sample sits at position (j + 1/2) / w_k of the merged stream, so every
prefix of the stream holds each dataset's share to within one sample.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from xmoe.data.errors import DataError
from xmoe.data.gpt import GPTSamples
from xmoe.data.indexed import IndexedDataset

SPLIT_NAMES = ("train", "valid", "test")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_blend(items: list[str]) -> list[tuple[float, str]]:
    """`data.path` items → (normalized weight, prefix) pairs; refuses malformed blends."""
    if not items:
        raise DataError("data.path is empty: give a prefix, or 'w1 prefix1 w2 prefix2'")
    numbers = [_number(x) for x in items]
    if len(items) % 2 == 0 and all(numbers[i] is not None for i in range(0, len(items), 2)):
        pairs = [(numbers[i], items[i + 1]) for i in range(0, len(items), 2)]
    elif all(n is None for n in numbers):
        pairs = [(1.0, p) for p in items]
    else:
        raise DataError(
            f"data.path={' '.join(items)!r} is not a blend: use 'prefix', 'p1 p2' or 'w1 p1 w2 p2'"
        )
    for w, p in pairs:
        if not np.isfinite(w) or w < 0:
            raise DataError(f"data.path: blend weight {w} for {p} is negative or not finite")
    total = sum(w for w, _ in pairs)
    if total <= 0:
        raise DataError("data.path: blend weights sum to 0: give at least one positive weight")
    return [(w / total, p) for w, p in pairs]


def parse_split(spec: str) -> list[float]:
    """'969,30,1' (or '98/2/0', '1') → three fractions summing to 1."""
    parts = [s for s in spec.replace("/", ",").split(",") if s.strip()]
    values = [_number(s) for s in parts]
    if not 1 <= len(values) <= 3 or any(v is None for v in values):
        raise DataError(f"data.split={spec!r}: give up to three numbers, e.g. 969,30,1")
    if any(v < 0 for v in values) or sum(values) <= 0:
        raise DataError(f"data.split={spec!r}: weights must be >= 0 with a positive sum")
    values = values + [0.0] * (3 - len(values))
    total = sum(values)
    return [v / total for v in values]


def split_ranges(fractions: list[float], size: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of `size` items, Megatron's rounding (last absorbs error)."""
    bounds = [0]
    for f in fractions:
        bounds.append(bounds[-1] + int(round(f * size)))
    excess = bounds[-1] - size
    bounds = [bounds[0]] + [b - excess for b in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(len(fractions))]


class BlendedSamples:
    """Samples from several sources interleaved by weight; deterministic, unbounded."""

    _GROW = 1 << 16

    def __init__(self, sources: list, weights: list[float]) -> None:
        self.sources = sources
        self.weights = np.asarray(weights, dtype=np.float64)
        self._which = np.zeros(0, dtype=np.int64)
        self._nth = np.zeros(0, dtype=np.int64)
        self._lock = threading.Lock()  # prefetch threads may grow the index concurrently

    def _extend(self, needed: int) -> None:
        m = max(needed, 2 * len(self._which), self._GROW)
        horizon = m + len(self.sources)
        which, pos, nth = [], [], []
        for k, w in enumerate(self.weights):
            if w <= 0:
                continue
            j = np.arange(int(horizon * w + 1.5), dtype=np.int64)
            which.append(np.full(len(j), k, dtype=np.int64))
            pos.append((j + 0.5) / w)
            nth.append(j)
        which_all, pos_all, nth_all = map(np.concatenate, (which, pos, nth))
        order = np.lexsort((which_all, pos_all))[:m]
        self._which, self._nth = which_all[order], nth_all[order]

    def locate(self, idx: int) -> tuple[int, int]:
        """(source, sample number within it) of blended sample `idx`."""
        with self._lock:
            if idx >= len(self._which):
                self._extend(idx + 1)
            which, nth = self._which, self._nth
        return int(which[idx]), int(nth[idx])

    def __getitem__(self, idx: int) -> np.ndarray:
        if idx < 0:
            raise IndexError(f"sample index {idx} < 0")
        k, j = self.locate(int(idx))
        return self.sources[k][j]

    def describe(self) -> dict:
        return {
            "source": "blend",
            "weights": self.weights.tolist(),
            "parts": [s.describe() for s in self.sources],
        }


def build_blend(
    paths: list[str],
    split_spec: str,
    split: str,
    seq_len: int,
    seed: int,
    vocab_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    rank: int = 0,
):
    """GPT samples of one split of the blend in `paths` (Megatron `--data-path` form)."""
    if split not in SPLIT_NAMES:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLIT_NAMES)}")
    blend = parse_blend(paths)
    fractions = parse_split(split_spec)
    which = SPLIT_NAMES.index(split)
    if fractions[which] == 0:
        raise DataError(f"data.split={split_spec!r} gives the {split} split no data")
    sources, weights = [], []
    for w, prefix in blend:
        ds = IndexedDataset(prefix)
        if w == 0:
            continue
        start, end = split_ranges(fractions, len(ds))[which]
        if end <= start:
            raise DataError(
                f"{prefix}: the {split} split is empty ({len(ds)} documents, split {split_spec})"
            )
        sources.append(
            GPTSamples(ds, start, end, seq_len, seed, cache_dir, rank, vocab_size, split)
        )
        weights.append(w)
    if len(sources) == 1:
        return sources[0]
    return BlendedSamples(sources, weights)
