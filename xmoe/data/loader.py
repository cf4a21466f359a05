"""Micro-batches for one data-parallel rank, in Megatron's global sample order.

The global batch of a step is the contiguous samples [consumed, consumed + global_batch).
Micro-step m of DP rank r takes samples consumed + m * (micro * dp) + r * micro, and the
`micro` that follow. The order therefore depends only on the number of samples consumed,
never on the data-parallel size: 1 rank with 2 accumulation steps and 2 ranks with 1 see
the same samples in the same step, and a resumed run continues at the next sample.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import torch

from xmoe.data.errors import DataError


class Samples(Protocol):
    """Any indexable source of `seq_len + 1` token samples, valid for every index >= 0."""

    def __getitem__(self, idx: int) -> np.ndarray: ...

    def describe(self) -> dict: ...


class TrainData:
    """The object the trainer pulls batches from; its position goes into checkpoints."""

    def __init__(
        self,
        samples: Samples,
        micro_batch: int,
        global_batch: int,
        dp_rank: int,
        dp_size: int,
        consumed_samples: int = 0,
        prefetch: int = 0,
    ) -> None:
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise DataError(
                f"data-parallel rank {dp_rank} is outside a data-parallel size of {dp_size}"
            )
        if global_batch % (micro_batch * dp_size):
            raise DataError(
                f"train.global_batch={global_batch} is not divisible by micro_batch x data-parallel "
                f"size = {micro_batch} x {dp_size}"
            )
        if consumed_samples % global_batch:
            raise DataError(
                f"consumed_samples={consumed_samples} is not a multiple of train.global_batch={global_batch}"
            )
        self.samples = samples
        self.micro_batch = micro_batch
        self.global_batch = global_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.accumulation = global_batch // (micro_batch * dp_size)
        self.consumed_samples = consumed_samples
        self.micro_step = 0
        # Background threads read the next micro-batches while the step computes; the
        # position in state_dict() only moves when next_batch() hands a batch out.
        self.prefetch = prefetch
        self._pool = ThreadPoolExecutor(prefetch, "xmoe-data") if prefetch > 0 else None
        self._ahead: deque[tuple[int, Future]] = deque()

    def sample_indices(self, ahead: int = 0) -> range:
        """Global sample numbers of this rank's micro-batch `ahead` micro-steps from now."""
        steps, micro_step = divmod(self.micro_step + ahead, self.accumulation)
        start = (
            self.consumed_samples
            + steps * self.global_batch
            + micro_step * self.micro_batch * self.dp_size
            + self.dp_rank * self.micro_batch
        )
        return range(start, start + self.micro_batch)

    def _fetch(self, indices: range) -> torch.Tensor:
        return torch.from_numpy(
            np.stack([np.asarray(self.samples[i], dtype=np.int64) for i in indices])
        )

    def next_batch(self) -> torch.Tensor:
        """Token ids [micro_batch, seq_len + 1] (int64, CPU): inputs are [:, :-1], labels [:, 1:]."""
        indices = self.sample_indices()
        if self._pool is None:
            batch = self._fetch(indices)
        else:
            if self._ahead and self._ahead[0][0] != indices.start:
                self._ahead.clear()  # the position was changed by load_state_dict
            for ahead in range(len(self._ahead), 2 * self.prefetch + 1):
                nxt = self.sample_indices(ahead)
                self._ahead.append((nxt.start, self._pool.submit(self._fetch, nxt)))
            batch = self._ahead.popleft()[1].result()
        self.micro_step += 1
        if self.micro_step == self.accumulation:
            self.micro_step = 0
            self.consumed_samples += self.global_batch
        return batch

    def state_dict(self) -> dict[str, Any]:
        # consumed_samples is global, so a checkpoint resumes under any data-parallel size.
        return {
            "consumed_samples": self.consumed_samples,
            "micro_step": self.micro_step,
            "data": self.samples.describe(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        consumed = int(state["consumed_samples"])
        micro_step = int(state.get("micro_step", 0))
        if consumed % self.global_batch:
            raise DataError(
                f"checkpoint consumed_samples={consumed} is not a multiple of "
                f"train.global_batch={self.global_batch}: resume with the same global batch"
            )
        if not 0 <= micro_step < self.accumulation:
            raise DataError(
                f"checkpoint was saved at micro-step {micro_step}, past the {self.accumulation} "
                "accumulation steps of this layout: save checkpoints at step boundaries"
            )
        self.consumed_samples = consumed
        self.micro_step = micro_step
