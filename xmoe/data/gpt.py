"""GPT training samples over an indexed dataset: documents packed end to end, seq_len + 1 each.

For one split (a contiguous range of documents) the documents are shuffled once with the
seed and concatenated (each already ends with EOD from preprocessing); sample k is tokens
[k * seq_len, (k + 1) * seq_len] of that stream, so neighbours share one token, the label of
the last position. An epoch is every complete sample once, in an order shuffled per epoch;
sample numbers past the end wrap into the next epoch, so the source never runs dry.

The document order, the sample boundaries and epoch 0's order are cached beside the data
(rank 0 builds them, other ranks wait); later epochs' orders are derived from the seed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from xmoe.data.cache import ensure_built, user_cache_dir, writable_dir
from xmoe.data.errors import DataError
from xmoe.data.indexed import IndexedDataset, data_path, index_path

INDEX_FORMAT = 1


def _fingerprint(prefix: str) -> str:
    """Identifies the data without reading it all: sizes plus the index's head and tail."""
    h = hashlib.sha256()
    idx = index_path(prefix)
    size = idx.stat().st_size
    h.update(f"{size}:{data_path(prefix).stat().st_size}".encode())
    with open(idx, "rb") as fh:
        h.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        h.update(fh.read())
    return h.hexdigest()[:16]


class GPTSamples:
    """Indexable samples of `seq_len + 1` tokens from documents [doc_start, doc_end)."""

    def __init__(
        self,
        dataset: IndexedDataset,
        doc_start: int,
        doc_end: int,
        seq_len: int,
        seed: int,
        cache_dir: str | os.PathLike | None = None,
        rank: int = 0,
        vocab_size: int | None = None,
        split_name: str = "train",
    ) -> None:
        self.dataset = dataset
        self.seq_len = seq_len
        self.seed = seed
        self.split_name = split_name
        self.doc_range = (doc_start, doc_end)
        key = json.dumps(
            [INDEX_FORMAT, _fingerprint(dataset.prefix), doc_start, doc_end, seq_len, seed]
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        name = f"{Path(dataset.prefix).name}-{split_name}-s{seq_len}-{digest}"
        beside = Path(f"{dataset.prefix}_xmoe_index")
        root = Path(cache_dir) if cache_dir else writable_dir(beside, user_cache_dir() / "index")
        self.cache_path = ensure_built(root / name, self._build, rank)
        meta = json.loads((self.cache_path / "meta.json").read_text())
        self.num_samples = int(meta["num_samples"])
        self.max_token = int(meta["max_token"])
        if vocab_size is not None and self.max_token >= vocab_size:
            raise DataError(
                f"{dataset.prefix}: token id {self.max_token} >= model.vocab_size={vocab_size}: "
                "the data was tokenized for a larger vocabulary"
            )
        load = {"mmap_mode": "r"}
        self.doc_idx = np.load(self.cache_path / "doc_idx.npy", **load)
        self.sample_doc = np.load(self.cache_path / "sample_doc.npy", **load)
        self.sample_offset = np.load(self.cache_path / "sample_offset.npy", **load)
        self._orders: dict[int, np.ndarray] = {0: np.load(self.cache_path / "order0.npy", **load)}

    def _build(self, out: Path) -> None:
        doc_start, doc_end = self.doc_range
        if doc_end <= doc_start:
            raise DataError(f"{self.dataset.prefix}: the {self.split_name} split has no documents")
        rng = np.random.default_rng([self.seed, 0xD0C5, doc_start, doc_end])
        doc_idx = rng.permutation(np.arange(doc_start, doc_end, dtype=np.int64))
        lengths = self.dataset.sequence_lengths[doc_idx].astype(np.int64)
        ends = np.cumsum(lengths)
        total = int(ends[-1])
        num_samples = (total - 1) // self.seq_len if total else 0
        if num_samples < 1:
            raise DataError(
                f"{self.dataset.prefix}: the {self.split_name} split has {total} tokens, too few "
                f"for one sample of model.seq_len + 1 = {self.seq_len + 1}"
            )
        starts_tok = np.arange(num_samples + 1, dtype=np.int64) * self.seq_len
        sample_doc = np.searchsorted(ends, starts_tok, side="right")
        sample_offset = starts_tok - (ends[sample_doc] - lengths[sample_doc])
        order0 = self._order(0, num_samples)
        max_token = self._max_token(doc_start, doc_end)
        np.save(out / "doc_idx.npy", doc_idx)
        np.save(out / "sample_doc.npy", sample_doc)
        np.save(out / "sample_offset.npy", sample_offset)
        np.save(out / "order0.npy", order0)
        meta = {"num_samples": num_samples, "tokens": total, "max_token": max_token}
        meta.update(prefix=self.dataset.prefix, doc_range=[doc_start, doc_end], seed=self.seed)
        (out / "meta.json").write_text(json.dumps(meta))

    def _max_token(self, doc_start: int, doc_end: int) -> int:
        ds = self.dataset
        lo = int(ds.sequence_pointers[doc_start])
        hi = (
            int(ds.sequence_pointers[doc_end - 1])
            + int(ds.sequence_lengths[doc_end - 1]) * ds.dtype.itemsize
        )
        tokens = np.frombuffer(ds._bin, ds.dtype, (hi - lo) // ds.dtype.itemsize, lo)
        best = 0
        for i in range(0, len(tokens), 1 << 24):
            best = max(best, int(tokens[i : i + (1 << 24)].max()))
        return best

    def _order(self, epoch: int, num_samples: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 0x5A4D, epoch, *self.doc_range])
        return rng.permutation(num_samples).astype(np.int64)

    def __len__(self) -> int:
        """Samples per epoch."""
        return self.num_samples

    def __getitem__(self, idx: int) -> np.ndarray:
        if idx < 0:
            raise IndexError(f"sample index {idx} < 0")
        epoch, pos = divmod(int(idx), self.num_samples)
        order = self._orders.get(epoch)
        if order is None:
            if len(self._orders) > 2:
                self._orders = {0: self._orders[0]}
            order = self._orders[epoch] = self._order(epoch, self.num_samples)
        k = int(order[pos])
        return self._sample(k)

    def _sample(self, k: int) -> np.ndarray:
        first, last = int(self.sample_doc[k]), int(self.sample_doc[k + 1])
        off_first, off_last = int(self.sample_offset[k]), int(self.sample_offset[k + 1])
        ds = self.dataset
        if first == last:
            return ds.get(int(self.doc_idx[first]), off_first, off_last - off_first + 1)
        parts = [ds.get(int(self.doc_idx[first]), off_first)]
        parts += [ds.get(int(self.doc_idx[d])) for d in range(first + 1, last)]
        parts.append(ds.get(int(self.doc_idx[last]), 0, off_last + 1))
        return np.concatenate(parts)

    def describe(self) -> dict:
        return {
            "source": "indexed",
            "prefix": self.dataset.prefix,
            "split": self.split_name,
            "samples_per_epoch": self.num_samples,
        }
