"""The shipped sample corpus as a ready indexed dataset, so the demo trains on real text.

`data.source=sample` tokenizes `corpus/stories.jsonl` with the byte tokenizer into a cache
directory on first use (rank 0 builds, other ranks wait); `python -m xmoe data sample`
writes it to a prefix of the user's choice.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from xmoe.data.cache import ensure_built, user_cache_dir
from xmoe.data.preprocess import PreprocessStats, preprocess
from xmoe.data.storygen import CORPUS_FILE

SAMPLE_NAME = "stories"


def corpus_file() -> Path:
    return CORPUS_FILE


def make_sample_dataset(output_prefix: str | os.PathLike, force: bool = False) -> PreprocessStats:
    """Tokenize the shipped corpus (byte tokenizer, EOD appended) into `output_prefix`."""
    return preprocess(
        [str(corpus_file())], os.fspath(output_prefix), "byte", "text", 1, True, force
    )


def ensure_sample_dataset(cache_dir: str | os.PathLike | None = None, rank: int = 0) -> Path:
    """Prefix of the byte-tokenized sample corpus, built once into the cache."""
    digest = hashlib.sha256(corpus_file().read_bytes()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir else user_cache_dir()
    target = root / "sample" / f"{SAMPLE_NAME}-byte-{digest}"

    def build(tmp: Path) -> None:
        stats = make_sample_dataset(tmp / SAMPLE_NAME)
        (tmp / "meta.json").write_text(
            json.dumps({"documents": stats.documents, "tokens": stats.tokens})
        )

    return ensure_built(target, build, rank) / SAMPLE_NAME
