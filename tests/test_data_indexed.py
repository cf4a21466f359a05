"""Megatron indexed dataset format: round trips, a hand-assembled file, every corruption case."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from xmoe.data.errors import DataError
from xmoe.data.indexed import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetWriter,
    best_dtype,
    write_indexed_dataset,
)


def _hand_assembled(prefix, docs_of_seqs, dtype, code):
    """Write .bin/.idx straight from the format definition, without our writer."""
    seqs = [np.asarray(s, dtype=dtype) for doc in docs_of_seqs for s in doc]
    lengths = [len(s) for s in seqs]
    pointers, pos = [], 0
    for s in seqs:
        pointers.append(pos)
        pos += s.nbytes
    bounds = [0]
    for doc in docs_of_seqs:
        bounds.append(bounds[-1] + len(doc))
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    idx += struct.pack("<Q", len(seqs)) + struct.pack("<Q", len(bounds))
    idx += struct.pack(f"<{len(lengths)}i", *lengths)
    idx += struct.pack(f"<{len(pointers)}q", *pointers)
    idx += struct.pack(f"<{len(bounds)}q", *bounds)
    with open(f"{prefix}.idx", "wb") as fh:
        fh.write(idx)
    with open(f"{prefix}.bin", "wb") as fh:
        for s in seqs:
            fh.write(s.astype(np.dtype(dtype).newbyteorder("<")).tobytes())
    return seqs, bounds


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.uint8, np.int64])
def test_round_trip_random_documents(tmp_path, dtype):
    rng = np.random.default_rng(int(np.dtype(dtype).itemsize))
    high = min(np.iinfo(dtype).max, 60000)
    docs = [rng.integers(0, high, rng.integers(0, 300)) for _ in range(200)]
    write_indexed_dataset(tmp_path / "d", docs, dtype)
    ds = IndexedDataset(tmp_path / "d")
    assert ds.dtype == np.dtype(dtype)
    assert len(ds) == ds.num_documents == 200
    assert ds.num_tokens == sum(len(d) for d in docs)
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds[i], doc)
    longest = max(range(len(docs)), key=lambda i: len(docs[i]))
    np.testing.assert_array_equal(ds.get(longest, 3, 5), docs[longest][3:8])
    assert not list(tmp_path.glob("*.tmp*"))


def test_hand_assembled_file_reads_back_exactly(tmp_path):
    docs = [[[5, 6, 7], [8]], [[9, 10]], [[]], [[65535, 0, 1, 2]]]
    seqs, bounds = _hand_assembled(tmp_path / "h", docs, np.uint16, 8)
    ds = IndexedDataset(tmp_path / "h")
    assert ds.dtype == np.uint16 and len(ds) == 5 and ds.num_documents == 4
    np.testing.assert_array_equal(ds.document_indices, bounds)
    for i, s in enumerate(seqs):
        np.testing.assert_array_equal(ds[i], s)
    assert [d.tolist() for d in ds.document(0)] == [[5, 6, 7], [8]]
    assert ds.sequence_modes is None


def test_writer_output_is_byte_identical_to_format_definition(tmp_path):
    docs = [[[1, 2, 3], [4, 5]], [[6]], [[7, 8, 9, 10]]]
    _hand_assembled(tmp_path / "ref", docs, np.int32, 4)
    with IndexedDatasetWriter(tmp_path / "ours", np.int32) as w:
        for doc in docs:
            for seq in doc:
                w.add_sequence(seq)
            w.end_document()
    for ext in (".idx", ".bin"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()


def test_bulk_add_documents_matches_one_by_one(tmp_path):
    docs = [[1, 2], [3], [4, 5, 6]]
    write_indexed_dataset(tmp_path / "a", docs)
    with IndexedDatasetWriter(tmp_path / "b") as w:
        w.add_documents(np.array([1, 2, 3]), np.array([2, 1]))
        w.add_documents(np.array([4, 5, 6]), np.array([3]))
    for ext in (".idx", ".bin"):
        assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes()


def test_dtype_codes_and_best_dtype():
    assert {c: str(d) for c, d in DTYPE_CODES.items()} == {
        1: "uint8",
        2: "int8",
        3: "int16",
        4: "int32",
        5: "int64",
        6: "float64",
        7: "float32",
        8: "uint16",
    }
    assert best_dtype(50257) == np.uint16 and best_dtype(65500) == np.int32


def test_multimodal_modes_are_detected(tmp_path):
    _hand_assembled(tmp_path / "m", [[[1, 2]], [[3]]], np.uint16, 8)
    with open(tmp_path / "m.idx", "ab") as fh:
        fh.write(bytes([0, 1]))
    ds = IndexedDataset(tmp_path / "m")
    assert ds.sequence_modes.tolist() == [0, 1]


def test_writer_refuses_ids_that_do_not_fit_and_leaves_nothing(tmp_path):
    with pytest.raises(DataError, match="do not fit uint16"):
        with IndexedDatasetWriter(tmp_path / "x", np.uint16) as w:
            w.add_document([1, 70000])
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def good(tmp_path):
    write_indexed_dataset(tmp_path / "g", [[1, 2, 3], [4, 5], [6, 7, 8, 9]])
    return tmp_path / "g"


def _patch(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _open_fails(prefix, fragment, file_ext):
    with pytest.raises(DataError) as err:
        IndexedDataset(prefix)
    msg = str(err.value)
    assert fragment in msg and f"{prefix.name}{file_ext}" in msg and "\n" not in msg


def test_truncated_bin(good):
    bin_file = good.with_suffix(".bin")
    bin_file.write_bytes(bin_file.read_bytes()[:-3])
    _open_fails(good, "points past the end", ".bin")


def test_wrong_magic(good):
    _patch(good.with_suffix(".idx"), 0, b"TNTIDX\x00\x00")
    _open_fails(good, "wrong magic", ".idx")


def test_wrong_version(good):
    _patch(good.with_suffix(".idx"), 9, struct.pack("<Q", 2))
    _open_fails(good, "unsupported index version 2", ".idx")


def test_unknown_dtype_code(good):
    _patch(good.with_suffix(".idx"), 17, bytes([9]))
    _open_fails(good, "unknown dtype code 9", ".idx")


def test_pointer_past_end(good):
    # third sequence's pointer (after header and 3 int32 lengths)
    _patch(good.with_suffix(".idx"), 34 + 12 + 16, struct.pack("<q", 10_000))
    _open_fails(good, "sequence 2 points past the end", ".bin")


def test_dtype_mismatch_in_header(good):
    _patch(good.with_suffix(".idx"), 17, bytes([4]))  # claims int32, .bin holds uint16
    _open_fails(good, "points past the end", ".bin")
    _patch(good.with_suffix(".idx"), 17, bytes([1]))  # claims uint8: .bin is too long
    _open_fails(good, "dtype mismatch", ".bin")


def test_dtype_mismatch_with_expected(good):
    with pytest.raises(DataError, match=r"g\.idx: tokens are uint16 but int32 was expected"):
        IndexedDataset(good, expected_dtype=np.int32)


def test_truncated_index(good):
    idx = good.with_suffix(".idx")
    idx.write_bytes(idx.read_bytes()[:-5])
    _open_fails(good, "truncated", ".idx")
    idx.write_bytes(idx.read_bytes()[:20])
    _open_fails(good, "truncated header", ".idx")


def test_trailing_garbage_in_index(good):
    idx = good.with_suffix(".idx")
    idx.write_bytes(idx.read_bytes() + b"\x00" * 5)
    _open_fails(good, "trailing bytes", ".idx")


def test_malformed_document_index(good):
    _patch(good.with_suffix(".idx"), 34 + 12 + 24 + 8, struct.pack("<q", 7))
    _open_fails(good, "document index is malformed", ".idx")


def test_empty_dataset(tmp_path):
    write_indexed_dataset(tmp_path / "e", [])
    _open_fails(tmp_path / "e", "empty dataset", ".idx")


def test_missing_file(good):
    good.with_suffix(".bin").unlink()
    _open_fails(good, "no such file", ".bin")


def test_interop_with_megatron_core(tmp_path):
    """Both directions against megatron-core itself, where it is installed."""
    mc = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    docs = [rng.integers(0, 50000, rng.integers(1, 200)) for _ in range(50)]

    write_indexed_dataset(tmp_path / "ours", docs, np.uint16)
    theirs_view = mc.IndexedDataset(str(tmp_path / "ours"))
    assert len(theirs_view) == 50
    np.testing.assert_array_equal(theirs_view.document_indices, np.arange(51))
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(theirs_view[i], doc)

    builder = mc.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for doc in docs[:20]:
        builder.add_item(torch.from_numpy(doc.astype(np.int64)))
        builder.end_document()
    builder.add_document(
        torch.from_numpy(np.concatenate(docs[20:23])), [len(d) for d in docs[20:23]]
    )
    builder.finalize(str(tmp_path / "theirs.idx"))
    ours_view = IndexedDataset(tmp_path / "theirs")
    assert len(ours_view) == 23 and ours_view.num_documents == 21
    for i, doc in enumerate(docs[:23]):
        np.testing.assert_array_equal(ours_view[i], doc)
    assert [len(s) for s in ours_view.document(20)] == [len(d) for d in docs[20:23]]
    # Same documents through our writer: byte-identical files.
    with IndexedDatasetWriter(tmp_path / "same", np.uint16) as w:
        for doc in docs[:20]:
            w.add_document(doc)
        for doc in docs[20:23]:
            w.add_sequence(doc)
        w.end_document()
    for ext in (".idx", ".bin"):
        assert (tmp_path / f"same{ext}").read_bytes() == (tmp_path / f"theirs{ext}").read_bytes()
