"""JSONL → Megatron indexed dataset, streaming, with ordered parallel tokenization.

Memory stays constant on inputs of any size: lines are read in chunks of about a megabyte,
at most two chunks per worker are in flight, and results are written in input order as soon
as the oldest finishes. Malformed and empty lines are counted, not fatal.
"""

from __future__ import annotations

import gzip
import io
import itertools
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


def _chunks(paths: list[str]) -> Iterator[bytes]:
    """Blocks of about CHUNK_BYTES holding whole lines (the last may lack its newline)."""
    for path in paths:
        stream = open_lines(path)
        try:
            tail = b""
            while True:
                block = stream.read(CHUNK_BYTES)
                if not block:
                    break
                cut = block.rfind(b"\n")
                if cut < 0:  # a line longer than a block: keep reading
                    tail += block
                    continue
                yield tail + block[: cut + 1]
                tail = block[cut + 1 :]
            if tail:
                yield tail
        except (OSError, EOFError, ValueError) as e:
            raise DataError(
                f"{path}: cannot read ({e}): truncated or corrupt compressed file?"
            ) from None
        finally:
            stream.close()


_WORKER: dict = {}


def _init_worker(spec: str, json_key: str, append_eod: bool, dtype: str) -> None:
    # The worker count is the parallelism knob; keep the Rust tokenizers single-threaded.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER.update(tok=load_tokenizer(spec), key=json_key, eod=append_eod, dtype=np.dtype(dtype))


def _encode_chunk(block: bytes) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """(tokens of all documents, their lengths, empty count, malformed count, bytes)."""
    tok, key, dtype = _WORKER["tok"], _WORKER["key"], _WORKER["dtype"]
    try:
        # Decode once per block; only a block with bad UTF-8 is split and decoded per line.
        lines: list = block.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        lines = block.split(b"\n")
    if block.endswith(b"\n"):
        lines.pop()
    texts: list[str] = []
    empty = malformed = 0
    for line in lines:
        if not line.strip():
            empty += 1
            continue
        try:
            text = json.loads(line)[key]
        except (ValueError, KeyError, TypeError, IndexError):  # bad JSON or UTF-8, no field
            malformed += 1
            continue
        if not isinstance(text, str):
            malformed += 1
        elif not text:
            empty += 1
        else:
            texts.append(text)
    docs = tok.encode_batch(texts)
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    if docs and isinstance(docs[0], bytes):  # the byte tokenizer: one join, no per-id work
        ids = np.frombuffer(b"".join(docs), dtype=np.uint8).astype(dtype)
    else:
        ids = np.fromiter(itertools.chain.from_iterable(docs), dtype, int(lengths.sum()))
    if _WORKER["eod"]:
        lengths += 1
        eod_at = np.cumsum(lengths) - 1
        with_eod = np.full(len(ids) + len(lengths), tok.eod, dtype=dtype)
        keep = np.ones(len(with_eod), dtype=bool)
        keep[eod_at] = False
        with_eod[keep] = ids
        ids = with_eod
    return ids, lengths, empty, malformed, len(block)


def _ordered_results(chunks: Iterator[bytes], workers: int, init_args: tuple) -> Iterator:
    if workers <= 1:
        _init_worker(*init_args)
        for chunk in chunks:
            yield _encode_chunk(chunk)
        return
    # fork: workers start in milliseconds and never re-run the caller's __main__ module.
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
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
    dtype = best_dtype(tok.vocab_size)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    stats = PreprocessStats()
    start = time.perf_counter()
    writer = IndexedDatasetWriter(output_prefix, dtype)
    try:
        init = (tokenizer, json_key, append_eod, dtype.str)
        results = _ordered_results(_chunks(inputs), workers, init)
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
