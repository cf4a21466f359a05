"""GPT samples over indexed data: packing, shuffles, epochs, splits, blends, the shared cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from xmoe.config import load_config
from xmoe.data import build_train_data
from xmoe.data.blend import BlendedSamples, build_blend, parse_blend, parse_split, split_ranges
from xmoe.data.errors import DataError
from xmoe.data.gpt import GPTSamples
from xmoe.data.indexed import IndexedDataset, write_indexed_dataset

EOD = 256


def _docs(n: int, seed: int = 0, vocab: int = 256) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(0, vocab, rng.integers(0, 40)), EOD) for _ in range(n)]


@pytest.fixture
def data(tmp_path):
    docs = _docs(120)
    write_indexed_dataset(tmp_path / "d", docs)
    return tmp_path / "d", docs


def test_samples_pack_shuffled_documents_with_one_token_overlap(data, tmp_path):
    prefix, docs = data
    ds = IndexedDataset(prefix)
    s = GPTSamples(ds, 10, 110, seq_len=16, seed=3)
    assert sorted(s.doc_idx.tolist()) == list(range(10, 110))
    assert s.doc_idx.tolist() != list(range(10, 110))
    stream = np.concatenate([docs[d] for d in s.doc_idx])
    assert len(s) == (len(stream) - 1) // 16
    for k in range(len(s)):
        np.testing.assert_array_equal(s._sample(k), stream[k * 16 : k * 16 + 17])


def test_epoch_is_a_permutation_and_wraps_with_a_new_order(data):
    prefix, _ = data
    s = GPTSamples(IndexedDataset(prefix), 0, 120, seq_len=16, seed=3)
    n = len(s)
    by_k = {s._sample(k).tobytes(): k for k in range(n)}
    assert len(by_k) == n  # random data: every window distinct
    epoch0 = [by_k[s[i].tobytes()] for i in range(n)]
    epoch1 = [by_k[s[n + i].tobytes()] for i in range(n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1 and epoch0 != list(range(n))
    epoch5 = [by_k[s[5 * n + i].tobytes()] for i in range(n)]
    assert sorted(epoch5) == list(range(n))


def test_same_seed_same_order_other_seed_other_order(data):
    prefix, _ = data
    ds = IndexedDataset(prefix)
    a = GPTSamples(ds, 0, 120, 16, seed=1)
    b = GPTSamples(ds, 0, 120, 16, seed=1)
    c = GPTSamples(ds, 0, 120, 16, seed=2)
    assert a.cache_path == b.cache_path != c.cache_path
    assert all((a[i] == b[i]).all() for i in range(30))
    assert any((a[i] != c[i]).any() for i in range(30))


def test_cache_is_built_once_beside_the_data(data):
    prefix, _ = data
    ds = IndexedDataset(prefix)
    a = GPTSamples(ds, 0, 120, 16, seed=1)
    assert a.cache_path.parent == prefix.parent / "d_xmoe_index"
    stamp = (a.cache_path / "meta.json").stat().st_mtime_ns
    time.sleep(0.01)
    GPTSamples(ds, 0, 120, 16, seed=1)
    assert (a.cache_path / "meta.json").stat().st_mtime_ns == stamp
    leftovers = [p for p in a.cache_path.parent.iterdir() if p != a.cache_path]
    assert all(p.name.endswith(".lock") for p in leftovers)  # no temporaries left


_RANK_SCRIPT = """
import json, sys, time
from pathlib import Path
from xmoe.data.gpt import GPTSamples
from xmoe.data.indexed import IndexedDataset

prefix, rank = Path(sys.argv[1]), int(sys.argv[2])
if rank == 0:  # build only once the other ranks are already waiting for the index
    while len(list(prefix.parent.glob("ready-*"))) < 2:
        time.sleep(0.02)
existed = any(p.name.startswith("d-train") for p in (prefix.parent / "d_xmoe_index").glob("*"))
if rank != 0:
    (prefix.parent / f"ready-{rank}").touch()
s = GPTSamples(IndexedDataset(prefix), 0, 120, 16, seed=9, rank=rank)
print(json.dumps([existed, [s[i].tolist() for i in range(10)], str(s.cache_path)]))
"""


def test_rank0_builds_while_other_ranks_wait(data):
    """Three processes (torch-free, so they start fast); ranks 1 and 2 ask first."""
    prefix, _ = data
    procs = {
        r: subprocess.Popen(
            [sys.executable, "-c", _RANK_SCRIPT, str(prefix), str(r)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in (1, 2, 0)
    }
    results = {}
    for r, p in procs.items():
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        results[r] = json.loads(out)
    assert not results[1][0] and not results[2][0]  # they asked before the index existed
    assert results[0][1] == results[1][1] == results[2][1]
    assert results[0][2] == results[1][2] == results[2][2]
    assert len([p for p in (prefix.parent / "d_xmoe_index").iterdir() if p.is_dir()]) == 1


def test_waiting_rank_times_out_with_a_clear_error(data, monkeypatch):
    prefix, _ = data
    monkeypatch.setenv("XMOE_DATA_WAIT_S", "0.2")
    with pytest.raises(DataError, match="timed out after 0s waiting for rank 0"):
        GPTSamples(IndexedDataset(prefix), 0, 120, 16, seed=1, rank=1)


def test_too_few_tokens_and_large_ids_are_refused(tmp_path):
    write_indexed_dataset(tmp_path / "s", [[1, 2, EOD]])
    with pytest.raises(DataError, match="too few for one sample"):
        GPTSamples(IndexedDataset(tmp_path / "s"), 0, 1, 16, seed=1)
    write_indexed_dataset(tmp_path / "v", [list(range(300)) + [EOD]])
    with pytest.raises(DataError, match="token id 299 >= model.vocab_size=257"):
        GPTSamples(IndexedDataset(tmp_path / "v"), 0, 1, 16, seed=1, vocab_size=257)


def test_split_parsing_and_megatron_rounding():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.03, 0.001])
    assert parse_split("98/2") == pytest.approx([0.98, 0.02, 0.0])
    assert split_ranges(parse_split("969,30,1"), 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_ranges(parse_split("1,1,1"), 10) == [(0, 4), (4, 7), (7, 10)]
    for bad in ("a,b", "1,-1", "0,0", "1,2,3,4"):
        with pytest.raises(DataError, match="data.split"):
            parse_split(bad)


def test_blend_parsing():
    assert parse_blend(["p"]) == [(1.0, "p")]
    assert parse_blend(["1", "a", "3", "b"]) == [(0.25, "a"), (0.75, "b")]
    assert parse_blend(["a", "b"]) == [(0.5, "a"), (0.5, "b")]
    with pytest.raises(DataError, match="blend weight -1.0 for b is negative"):
        parse_blend(["1", "a", "-1", "b"])
    with pytest.raises(DataError, match="not a blend"):
        parse_blend(["1", "a", "b"])
    with pytest.raises(DataError, match="sum to 0"):
        parse_blend(["0", "a"])


def test_blend_follows_weights_within_one_sample_and_is_stable():
    class Tagged:
        def __init__(self, tag):
            self.tag = tag

        def __getitem__(self, j):
            return np.array([self.tag, j])

    weights = [0.2, 0.5, 0.3]
    blend = BlendedSamples([Tagged(0), Tagged(1), Tagged(2)], weights)
    tags = np.array([blend[i][0] for i in range(3000)])
    for n in (1, 7, 100, 999, 3000):
        counts = np.bincount(tags[:n], minlength=3)
        assert np.all(np.abs(counts - n * np.array(weights)) <= 1.0), (n, counts)
    # each source's samples are taken in order, none skipped
    for k in range(3):
        nth = [blend[i][1] for i in range(3000) if tags[i] == k]
        assert nth == list(range(len(nth)))
    # growing the index leaves earlier positions unchanged
    fresh = BlendedSamples([Tagged(0), Tagged(1), Tagged(2)], weights)
    far = fresh[200_000]
    assert [fresh[i][0] for i in range(3000)] == tags.tolist()
    assert far[0] in (0, 1, 2)


def test_build_blend_of_two_datasets(tmp_path):
    write_indexed_dataset(tmp_path / "a", _docs(60, seed=1))
    write_indexed_dataset(tmp_path / "b", _docs(60, seed=2))
    blend = build_blend(
        ["0.25", str(tmp_path / "a"), "0.75", str(tmp_path / "b")], "9,1,0", "train", 16, 5
    )
    assert isinstance(blend, BlendedSamples)
    a, b = blend.sources
    assert a.doc_range == (0, 54) and b.doc_range == (0, 54)
    k, j = blend.locate(10)
    np.testing.assert_array_equal(blend[10], blend.sources[k][j])
    valid = build_blend([str(tmp_path / "a")], "9,1,0", "valid", 16, 5)
    assert valid.doc_range == (54, 60)
    with pytest.raises(DataError, match="gives the test split no data"):
        build_blend([str(tmp_path / "a")], "9,1,0", "test", 16, 5)
    with pytest.raises(DataError, match=r"nope\.idx: no such file"):
        build_blend([str(tmp_path / "nope")], "1", "train", 16, 5)


def _indexed_cfg(prefix, *extra):
    return load_config(
        "tiny",
        ["data.source=indexed", f"data.path={prefix}", "model.seq_len=16", "data.split=1", *extra],
    )


def test_indexed_order_identical_across_restarts_and_dp_sizes(data):
    prefix, _ = data
    cfg = _indexed_cfg(prefix, "train.micro_batch=2", "train.global_batch=4")
    one = build_train_data(cfg, 0, 1)
    steps_one = [torch.cat([one.next_batch(), one.next_batch()]) for _ in range(40)]
    ranks = [build_train_data(cfg, r, 2) for r in range(2)]
    steps_two = [torch.cat([ranks[0].next_batch(), ranks[1].next_batch()]) for _ in range(40)]
    for x, y in zip(steps_one, steps_two):
        assert torch.equal(x, y)
    # a fresh process-level restart from a checkpointed position
    resumed = build_train_data(cfg, 1, 2)
    resumed.load_state_dict(ranks[1].state_dict() | {"consumed_samples": 60})
    assert torch.equal(resumed.next_batch(), steps_one[15][2:])
    # 40 steps x 4 samples wraps past one epoch without running dry
    assert 160 > len(one.samples)


def test_sample_source_trains_on_the_shipped_corpus(tmp_path):
    cfg = load_config("tiny", ["data.source=sample", f"data.cache_dir={tmp_path}"])
    batch = build_train_data(cfg, 0, 1).next_batch()
    assert batch.shape == (8, 129) and int(batch.max()) <= 256
    text = bytes(t for t in batch[0].tolist() if t < 256).decode("utf-8")
    assert sum(c.isalpha() or c == " " for c in text) > 0.8 * len(text)
    assert os.path.isdir(tmp_path / "sample")
