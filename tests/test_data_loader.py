"""Synthetic data and the Megatron-order micro-batch loader."""

from __future__ import annotations

import math

import pytest
import torch

from xmoe.config import load_config
from xmoe.data import DataError, TrainData, build_train_data
from xmoe.data.synthetic import SyntheticSamples


def _cfg(*overrides: str):
    return load_config("tiny", list(overrides))


def _step_rows(cfg, dp_size: int, steps: int, consumed: int = 0) -> list[torch.Tensor]:
    """Per step, the global batch assembled from every DP rank's micro-batches, in sample order."""
    loaders = [build_train_data(cfg, r, dp_size, consumed) for r in range(dp_size)]
    accum = cfg.train.global_batch // (cfg.train.micro_batch * dp_size)
    out = []
    for _ in range(steps):
        parts = []
        for _m in range(accum):
            for ld in loaders:
                parts.append(ld.next_batch())
        out.append(torch.cat(parts))
    return out


def test_batch_shape_dtype_and_vocab_bound():
    cfg = _cfg()
    batch = build_train_data(cfg, 0, 1).next_batch()
    assert batch.shape == (cfg.train.micro_batch, cfg.model.seq_len + 1)
    assert batch.dtype == torch.int64
    assert int(batch.min()) >= 0 and int(batch.max()) < cfg.model.vocab_size


def test_synthetic_is_deterministic_from_seed_and_index():
    a = SyntheticSamples(320, 64, seed=5)
    b = SyntheticSamples(320, 64, seed=5)
    c = SyntheticSamples(320, 64, seed=6)
    assert (a[17] == b[17]).all()
    assert not (a[17] == a[18]).all()
    assert not (a[17] == c[17]).all()


def test_order_independent_of_dp_size_and_accumulation():
    cfg = _cfg("train.micro_batch=2", "train.global_batch=8")
    one = _step_rows(cfg, 1, steps=3)  # accumulation 4
    two = _step_rows(cfg, 2, steps=3)  # accumulation 2
    four = _step_rows(cfg, 4, steps=3)  # accumulation 1
    samples = SyntheticSamples(cfg.model.vocab_size, cfg.model.seq_len, cfg.train.seed)
    for step in range(3):
        assert torch.equal(one[step], two[step]) and torch.equal(one[step], four[step])
        expected = torch.stack([torch.from_numpy(samples[step * 8 + i]) for i in range(8)])
        assert torch.equal(one[step], expected)


def test_resume_continues_at_next_sample():
    cfg = _cfg("train.micro_batch=2", "train.global_batch=4")
    straight = _step_rows(cfg, 2, steps=5)
    first = build_train_data(cfg, 0, 2)
    for _ in range(3):
        first.next_batch()
    state = first.state_dict()
    assert state["consumed_samples"] == 12 and state["micro_step"] == 0
    # Resume with a different DP size: the global order does not change.
    resumed = build_train_data(cfg, 0, 1)
    resumed.load_state_dict(state)
    rows = torch.cat([resumed.next_batch(), resumed.next_batch()])
    assert torch.equal(rows, straight[3])
    assert torch.equal(_step_rows(cfg, 1, steps=2, consumed=12)[1], straight[4])


def test_bad_layouts_and_states_are_refused():
    cfg = _cfg("train.micro_batch=3", "train.global_batch=6")
    with pytest.raises(DataError, match="not divisible"):
        build_train_data(cfg, 0, 4)
    with pytest.raises(DataError, match="outside"):
        build_train_data(cfg, 2, 2)
    ld = build_train_data(cfg, 0, 1)
    with pytest.raises(DataError, match="multiple of train.global_batch"):
        ld.load_state_dict({"consumed_samples": 7})
    with pytest.raises(DataError, match="micro-step"):
        TrainData(ld.samples, 3, 6, 0, 2).load_state_dict({"consumed_samples": 6, "micro_step": 1})


def test_synthetic_loss_falls_substantially():
    """A small causal model's loss must fall far below ln(vocab) within 40 steps."""
    torch.manual_seed(0)
    cfg = _cfg()
    vocab, dim = cfg.model.vocab_size, 64
    data = build_train_data(cfg, 0, 1)
    emb = torch.nn.Embedding(vocab, dim)
    prev = torch.nn.Embedding(vocab, dim)  # sees the token before: a little context
    head = torch.nn.Linear(dim, vocab)
    params = [*emb.parameters(), *prev.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-2)
    losses = []
    for _ in range(40):
        tokens = data.next_batch()
        x, y = tokens[:, :-1], tokens[:, 1:]
        x_prev = torch.cat([x[:, :1], x[:, :-1]], dim=1)
        logits = head(torch.tanh(emb(x) + prev(x_prev)))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > math.log(vocab) - 0.5
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]


def test_prefetch_threads_give_the_same_batches_and_positions():
    cfg = _cfg("train.micro_batch=2", "train.global_batch=8")
    plain = build_train_data(cfg, 1, 2)
    ahead = build_train_data(load_config("tiny", [*_overrides(cfg), "data.num_workers=2"]), 1, 2)
    assert ahead.prefetch == 2
    for _ in range(5):
        assert torch.equal(plain.next_batch(), ahead.next_batch())
        assert plain.state_dict() == ahead.state_dict()
    # moving the position drops what was read ahead
    ahead.load_state_dict({"consumed_samples": 400, "micro_step": 1})
    plain.load_state_dict({"consumed_samples": 400, "micro_step": 1})
    for _ in range(3):
        assert torch.equal(plain.next_batch(), ahead.next_batch())


def _overrides(cfg) -> list[str]:
    return [
        f"train.micro_batch={cfg.train.micro_batch}",
        f"train.global_batch={cfg.train.global_batch}",
    ]
