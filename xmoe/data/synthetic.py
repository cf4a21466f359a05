"""Synthetic token sequences with structure a tiny model learns in a few dozen steps.

For smoke tests, demos and benchmarks that need no files. Each sample is drawn from one of a
few fixed random Markov chains over 32 token ids: a token has two possible successors
(probabilities 0.9 and 0.1), and which successors depends on the chain. A model first learns
the token frequencies and bigrams, then infers the chain from context; the floor is about
0.33 nats. Seen with the tiny preset (plain AdamW, lr 3e-3): loss 5.9 at step 0, 2.4 at
step 20, 0.8 at step 60. Sample `i` depends only on (seed, i), so any data-parallel layout
and any resume point sees the same tokens.
"""

from __future__ import annotations

import numpy as np

NUM_CHAINS = 4
MAX_STATES = 32
_P_FIRST = 0.9


class SyntheticSamples:
    """Infinite, indexable samples of `seq_len + 1` token ids below `vocab_size`."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int) -> None:
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.seed = seed
        rng = np.random.default_rng([seed, 0x5EED])
        num_states = min(vocab_size, MAX_STATES)
        # Spread the states over the whole vocabulary rather than the first ids.
        self.state_tokens = rng.permutation(vocab_size)[:num_states].astype(np.int64)
        succ_CS2 = np.stack(
            [
                np.stack([rng.choice(num_states, size=2, replace=False) for _ in range(num_states)])
                for _ in range(NUM_CHAINS)
            ]
        )
        # Python lists: the per-token walk below is a tight scalar loop, faster on lists.
        self._succ = succ_CS2.tolist()

    def __getitem__(self, idx: int) -> np.ndarray:
        if idx < 0:
            raise IndexError(f"sample index {idx} < 0")
        rng = np.random.default_rng([self.seed, 0x5A3F, int(idx)])
        table = self._succ[int(rng.integers(NUM_CHAINS))]
        branch = (rng.random(self.seq_len) >= _P_FIRST).tolist()
        state = int(rng.integers(len(table)))
        states = [state]
        for b in branch:
            state = table[state][b]
            states.append(state)
        return self.state_tokens[np.asarray(states)]

    def describe(self) -> dict:
        return {"source": "synthetic", "seed": self.seed, "vocab_size": self.vocab_size}
