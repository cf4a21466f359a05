"""JSONL → Megatron indexed dataset, streaming, with ordered parallel tokenization.

Memory stays constant on inputs of any size: lines are read in chunks of about a megabyte,
at most two chunks per worker are in flight, and results are written in input order as soon
as the oldest finishes. Malformed and empty lines are counted, not fatal.
"""

from __future__ import annotations

import gzip
import io
import json
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xmoe.data.errors import DataError
from xmoe.data.indexed import IndexedDatasetWriter, best_dtype, data_path, index_path
from xmoe.data.tokenizer import load_tokenizer

CHUNK_BYTES = 1 << 20


@dataclass
class PreprocessStats:
    """What a preprocessing run read and wrote; printed as its summary."""

    documents: int = 0
    tokens: int = 0
    empty: int = 0
    malformed: int = 0
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes_read / 1e6 / max(self.seconds, 1e-9)

    def summary(self) -> str:
        return (
            f"{self.documents} documents, {self.tokens} tokens; skipped {self.empty} empty and "
            f"{self.malformed} malformed lines; {self.bytes_read / 1e6:.1f} MB in "
            f"{self.seconds:.1f}s ({self.mb_per_s:.2f} MB/s)"
        )


def open_lines(path: str | os.PathLike) -> io.BufferedIOBase:
    """A binary line stream over .jsonl, .jsonl.gz or .jsonl.zst (workers decode UTF-8)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: input file not found")
    if p.name.endswith(".gz"):
        raw = gzip.open(p, "rb")
    elif p.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise DataError(
                f"{p}: .zst input needs the 'zstandard' package: pip install 'xmoe[zstd]'"
            ) from None
        raw = zstandard.ZstdDecompressor().stream_reader(open(p, "rb"), closefd=True)
    else:
        raw = open(p, "rb")  # noqa: SIM115 - wrapped and closed by the caller
    return io.BufferedReader(raw, buffer_size=CHUNK_BYTES)


def _chunks(paths: list[str]) -> Iterator[list[bytes]]:
    for path in paths:
        stream = open_lines(path)
        try:
            chunk, size = [], 0
            for line in stream:
                chunk.append(line)
                size += len(line)
                if size >= CHUNK_BYTES:
                    yield chunk
                    chunk, size = [], 0
            if chunk:
                yield chunk
        except (OSError, EOFError, ValueError) as e:
            raise DataError(
                f"{path}: cannot read ({e}): truncated or corrupt compressed file?"
            ) from None
        finally:
            stream.close()


_WORKER: dict = {}


def _init_worker(spec: str, json_key: str, append_eod: bool) -> None:
    _WORKER.update(tok=load_tokenizer(spec), key=json_key, eod=append_eod)


def _encode_chunk(lines: list[bytes]) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """(tokens of all documents, their lengths, empty count, malformed count, bytes)."""
    tok, key, eod = _WORKER["tok"], _WORKER["key"], _WORKER["eod"]
    ids: list[int] = []
    lengths: list[int] = []
    empty = malformed = nbytes = 0
    for line in lines:
        nbytes += len(line)
        if not line.strip():
            empty += 1
            continue
        try:
            record = json.loads(line)
            text = record[key]
        except (ValueError, KeyError, TypeError, IndexError):  # bad JSON or UTF-8, no field
            malformed += 1
            continue
        if not isinstance(text, str):
            malformed += 1
            continue
        if not text:
            empty += 1
            continue
        doc = tok.encode(text)
        if eod:
            doc.append(tok.eod)
        ids.extend(doc)
        lengths.append(len(doc))
    return (
        np.asarray(ids, dtype=np.int64),
        np.asarray(lengths, dtype=np.int64),
        empty,
        malformed,
        nbytes,
    )


def _ordered_results(chunks: Iterator[list[bytes]], workers: int, init_args: tuple) -> Iterator:
    if workers <= 1:
        _init_worker(*init_args)
        for chunk in chunks:
            yield _encode_chunk(chunk)
        return
    ctx = mp.get_context("spawn" if sys.platform == "darwin" else "forkserver")
    with ctx.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def preprocess(
    inputs: list[str],
    output_prefix: str,
    tokenizer: str = "byte",
    json_key: str = "text",
    workers: int = 1,
    append_eod: bool = True,
    force: bool = False,
    progress: Callable[[PreprocessStats], None] | None = None,
) -> PreprocessStats:
    """Tokenize JSONL documents into `output_prefix`.bin/.idx (one sequence per document)."""
    if not inputs:
        raise DataError("preprocess needs at least one --input file")
    for f in (data_path(output_prefix), index_path(output_prefix)):
        if f.exists() and not force:
            raise DataError(f"{f} exists: pass --force to overwrite it")
    for path in inputs:
        if not Path(path).is_file():
            raise DataError(f"{path}: input file not found")
    tok = load_tokenizer(tokenizer)  # fail here, once, rather than in every worker
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    stats = PreprocessStats()
    start = time.perf_counter()
    writer = IndexedDatasetWriter(output_prefix, best_dtype(tok.vocab_size))
    try:
        results = _ordered_results(_chunks(inputs), workers, (tokenizer, json_key, append_eod))
        for ids, lengths, empty, malformed, nbytes in results:
            writer.add_documents(ids, lengths)
            stats.documents += len(lengths)
            stats.tokens += len(ids)
            stats.empty += empty
            stats.malformed += malformed
            stats.bytes_read += nbytes
            stats.seconds = time.perf_counter() - start
            if progress is not None:
                progress(stats)
        if stats.documents == 0:
            raise DataError(
                f"{', '.join(inputs)}: no documents with a non-empty {json_key!r} field "
                f"({stats.empty} empty, {stats.malformed} malformed lines); nothing written"
            )
    except BaseException:
        writer.abort()
        raise
    writer.finalize()
    stats.seconds = time.perf_counter() - start
    return stats
