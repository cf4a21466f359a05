"""Megatron-LM's mmap indexed dataset (`PREFIX.bin` + `PREFIX.idx`), read and written.

Users arrive with data that Megatron's `tools/preprocess_data.py` wrote, and leave with files
Megatron must read, so both directions are byte-compatible with megatron-core.

Layout of `PREFIX.idx`, little-endian:
    9 bytes   magic b"MMIDIDX\\x00\\x00"
    <Q        version, 1
    <B        dtype code of the tokens in .bin (DTYPE_CODES)
    <Q        S, the number of sequences
    <Q        D, the number of document boundaries (documents + 1)
    int32[S]  sequence lengths, in tokens
    int64[S]  byte offset of each sequence in .bin
    int64[D]  document boundaries: sequence indices, starting with 0 and ending with S
    int8[S]   sequence modes, only in multimodal files (detected from the file size)
`PREFIX.bin` is the sequences' tokens back to back, with no header.
"""

from __future__ import annotations

import array
import os
import struct
from pathlib import Path

import numpy as np

from xmoe.data.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")
HEADER_BYTES = _HEADER.size  # 34

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}


def dtype_code(dtype: np.dtype | type) -> int:
    dt = np.dtype(dtype)
    if dt not in _CODE_OF:
        raise DataError(f"token dtype {dt} cannot be stored in a Megatron indexed dataset")
    return _CODE_OF[dt]


def best_dtype(vocab_size: int) -> np.dtype:
    """The token dtype Megatron's preprocessing picks for a vocabulary of this size."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def index_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


def data_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


class IndexedDataset:
    """Read-only, memory-mapped view of a Megatron indexed dataset; validated on open."""

    def __init__(self, prefix: str | os.PathLike, expected_dtype: np.dtype | None = None) -> None:
        self.prefix = os.fspath(prefix)
        idx_file, bin_file = index_path(prefix), data_path(prefix)
        for f in (idx_file, bin_file):
            if not f.is_file():
                hint = (
                    ": give the prefix without .bin/.idx"
                    if self.prefix.endswith((".bin", ".idx"))
                    else " (a dataset prefix needs both .bin and .idx)"
                )
                raise DataError(f"{f}: no such file{hint}")
        self._read_index(idx_file)
        if expected_dtype is not None and np.dtype(expected_dtype) != self.dtype:
            raise DataError(
                f"{idx_file}: tokens are {self.dtype} but {np.dtype(expected_dtype)} was expected "
                "(dtype mismatch: was it written for another tokenizer?)"
            )
        self._check_bin(bin_file)
        self._bin = (
            np.memmap(bin_file, dtype=np.uint8, mode="r")
            if self.bin_bytes
            else np.zeros(0, np.uint8)
        )

    def _read_index(self, idx_file: Path) -> None:
        size = idx_file.stat().st_size
        with open(idx_file, "rb") as fh:
            head = fh.read(HEADER_BYTES)
        if len(head) < len(MAGIC) or head[: len(MAGIC)] != MAGIC:
            raise DataError(
                f"{idx_file}: wrong magic {head[:9]!r} (expected {MAGIC!r}): "
                "not a Megatron mmap indexed dataset index"
            )
        if len(head) < HEADER_BYTES:
            raise DataError(f"{idx_file}: truncated header ({size} of {HEADER_BYTES} bytes)")
        _, version, code, num_seq, num_doc = _HEADER.unpack(head)
        if version != VERSION:
            raise DataError(
                f"{idx_file}: unsupported index version {version} (only {VERSION} is known)"
            )
        if code not in DTYPE_CODES:
            raise DataError(f"{idx_file}: unknown dtype code {code} (known: 1-8)")
        body = 12 * num_seq + 8 * num_doc
        if size < HEADER_BYTES + body:
            raise DataError(
                f"{idx_file}: truncated: {size} bytes, but {num_seq} sequences and {num_doc} "
                f"document boundaries need {HEADER_BYTES + body}"
            )
        multimodal = size == HEADER_BYTES + body + num_seq and num_seq > 0
        if size != HEADER_BYTES + body and not multimodal:
            raise DataError(
                f"{idx_file}: {size} bytes, expected {HEADER_BYTES + body}: "
                "trailing bytes after the document index"
            )
        self.dtype = DTYPE_CODES[code]
        mm = np.memmap(idx_file, dtype=np.uint8, mode="r") if size else None
        off = HEADER_BYTES
        self.sequence_lengths = np.frombuffer(mm, np.int32, num_seq, off)
        off += 4 * num_seq
        self.sequence_pointers = np.frombuffer(mm, np.int64, num_seq, off)
        off += 8 * num_seq
        self.document_indices = np.frombuffer(mm, np.int64, num_doc, off)
        off += 8 * num_doc
        self.sequence_modes = np.frombuffer(mm, np.int8, num_seq, off) if multimodal else None
        if num_seq == 0:
            raise DataError(f"{idx_file}: empty dataset (0 sequences)")
        docs = self.document_indices
        if num_doc < 2 or docs[0] != 0 or docs[-1] != num_seq or (np.diff(docs) < 0).any():
            raise DataError(
                f"{idx_file}: document index is malformed (must rise from 0 to the {num_seq} sequences)"
            )
        if (self.sequence_lengths < 0).any() or (self.sequence_pointers < 0).any():
            raise DataError(f"{idx_file}: negative sequence length or pointer")

    def _check_bin(self, bin_file: Path) -> None:
        self.bin_bytes = bin_file.stat().st_size
        item = self.dtype.itemsize
        ends = self.sequence_pointers + self.sequence_lengths.astype(np.int64) * item
        last = int(ends.max())
        if last > self.bin_bytes:
            bad = int(np.argmax(ends > self.bin_bytes))
            raise DataError(
                f"{bin_file}: sequence {bad} points past the end of the file "
                f"(needs {last} bytes, file has {self.bin_bytes}): truncated .bin?"
            )
        if self.bin_bytes != last:
            raise DataError(
                f"{bin_file}: {self.bin_bytes} bytes but the index covers {last} "
                f"({self.dtype} tokens): dtype mismatch, or .bin and .idx do not belong together"
            )

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens of sequence `idx` from `offset`, `length` of them (default: to its end)."""
        n = int(self.sequence_lengths[idx])
        if length is None:
            length = n - offset
        if offset < 0 or length < 0 or offset + length > n:
            raise IndexError(f"tokens [{offset}, {offset + length}) outside sequence {idx} of {n}")
        ptr = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, self.dtype, length, ptr)

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.get(idx)

    def document(self, doc: int) -> list[np.ndarray]:
        """The sequences of document `doc` (one, for data preprocessed without sentence splits)."""
        lo, hi = int(self.document_indices[doc]), int(self.document_indices[doc + 1])
        return [self.get(i) for i in range(lo, hi)]


class IndexedDatasetWriter:
    """Streams sequences to `PREFIX.bin` and writes `PREFIX.idx` on `finalize()`.

    Both files are written under temporary names and renamed into place only when complete,
    so a failed or interrupted write never leaves (or clobbers) a half-written dataset.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type = np.uint16) -> None:
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        self._tmp_suffix = f".tmp{os.getpid()}"
        self._bin_tmp = Path(f"{data_path(prefix)}{self._tmp_suffix}")
        self._bin = open(self._bin_tmp, "wb")  # noqa: SIM115 - closed in finalize/abort
        # Compact arrays, not lists: 12 bytes per document even for 100M documents.
        self._lengths = array.array("i")
        self._documents = array.array("q", [0])

    def _write(self, tokens: np.ndarray | list[int]) -> None:
        arr = np.asarray(tokens)
        if arr.size and np.issubdtype(arr.dtype, np.integer) and self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            if arr.min() < info.min or arr.max() > info.max:
                raise DataError(
                    f"{self.prefix}: token ids {arr.min()}..{arr.max()} do not fit {self.dtype}"
                )
        self._bin.write(np.ascontiguousarray(arr, dtype=self.dtype).tobytes(order="C"))

    def add_sequence(self, tokens: np.ndarray | list[int]) -> None:
        """Append one sequence; call `end_document` after a document's last sequence."""
        self._write(tokens)
        self._lengths.append(len(tokens))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Many one-sequence documents at once: `tokens` back to back, `lengths` each."""
        if int(np.sum(lengths)) != len(tokens):
            raise ValueError(f"lengths sum to {int(np.sum(lengths))}, tokens has {len(tokens)}")
        self._write(tokens)
        first = len(self._lengths)
        self._lengths.frombytes(np.asarray(lengths, dtype=np.int32).tobytes())
        self._documents.frombytes(
            np.arange(first + 1, len(self._lengths) + 1, dtype=np.int64).tobytes()
        )

    def end_document(self) -> None:
        self._documents.append(len(self._lengths))

    def add_document(self, tokens: np.ndarray | list[int]) -> None:
        """One document as one sequence: what GPT preprocessing writes."""
        self.add_sequence(tokens)
        self.end_document()

    def finalize(self) -> None:
        if self._documents[-1] != len(self._lengths):
            self.end_document()
        self._bin.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        documents = np.frombuffer(self._documents, dtype=np.int64)
        idx_tmp = Path(f"{index_path(self.prefix)}{self._tmp_suffix}")
        with open(idx_tmp, "wb") as fh:
            fh.write(_HEADER.pack(MAGIC, VERSION, self._code, len(lengths), len(documents)))
            fh.write(lengths.tobytes(order="C"))
            fh.write(pointers.tobytes(order="C"))
            fh.write(documents.tobytes(order="C"))
        os.replace(self._bin_tmp, data_path(self.prefix))
        os.replace(idx_tmp, index_path(self.prefix))

    def abort(self) -> None:
        """Drop everything written so far."""
        self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def write_indexed_dataset(
    prefix: str | os.PathLike, documents: list, dtype: np.dtype | type = np.uint16
) -> None:
    """Write `documents` (each a token sequence) as a one-sequence-per-document dataset."""
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in documents:
            writer.add_document(doc)
