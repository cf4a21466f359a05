"""Training data: Megatron-LM indexed datasets, GPT samples, preprocessing and tokenizers.

The trainer calls `build_train_data(cfg, dp_rank, dp_size, consumed_samples)` and pulls
`next_batch()` from the result; `cfg.data.source` picks synthetic tokens (the default),
Megatron `.bin`/`.idx` files (`indexed`, `cfg.data.path` in `--data-path` blend form) or the
shipped sample corpus (`sample`, tokenized with the byte tokenizer on first use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from xmoe.config import Config
from xmoe.data.errors import DataError

if TYPE_CHECKING:
    from xmoe.data.loader import Samples, TrainData

__all__ = ["DataError", "Samples", "TrainData", "build_samples", "build_train_data"]


def __getattr__(name: str) -> Any:
    # torch is imported only by the loader, so preprocessing and its workers start fast.
    if name in ("Samples", "TrainData"):
        from xmoe.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


SPLITS = ("train", "valid", "test")


def build_samples(cfg: Config, split: str = "train", rank: int = 0) -> Samples:
    """The indexable sample source for `split` of the configured data.

    For file-backed sources, rank 0 builds the cached sample index and other ranks wait for
    it; pass the caller's data-parallel rank as `rank`.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    d, m, t = cfg.data, cfg.model, cfg.train
    if d.source == "synthetic":
        from xmoe.data.synthetic import SyntheticSamples

        # Distinct seeds per split keep validation samples out of the training stream.
        return SyntheticSamples(m.vocab_size, m.seq_len, t.seed + 7919 * SPLITS.index(split))
    from xmoe.data.blend import build_blend

    if d.source == "sample":
        from xmoe.data.sample import ensure_sample_dataset

        prefix = ensure_sample_dataset(d.cache_dir or None, rank=rank)
        paths = [str(prefix)]
    else:
        paths = list(d.path)
    return build_blend(
        paths,
        split_spec=d.split,
        split=split,
        seq_len=m.seq_len,
        seed=t.seed,
        vocab_size=m.vocab_size,
        cache_dir=d.cache_dir or None,
        rank=rank,
    )


def build_train_data(
    cfg: Config, dp_rank: int, dp_size: int, consumed_samples: int = 0
) -> TrainData:
    """Micro-batches of [train.micro_batch, model.seq_len + 1] token ids for one DP rank.

    `data.num_workers` > 0 reads that many micro-batches ahead in background threads.
    """
    from xmoe.data.loader import TrainData

    samples = build_samples(cfg, "train", rank=dp_rank)
    return TrainData(
        samples,
        micro_batch=cfg.train.micro_batch,
        global_batch=cfg.train.global_batch,
        dp_rank=dp_rank,
        dp_size=dp_size,
        consumed_samples=consumed_samples,
        prefetch=cfg.data.num_workers,
    )
