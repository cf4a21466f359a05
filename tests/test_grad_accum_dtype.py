"""fp32 gradient accumulation under bf16 (`train.grad_accum_dtype=fp32`): the trainer hands
DeepSpeed the option, gets its fp32-accumulating optimizer, and expert parallelism still
reduces each gradient over the right ranks (EP = 2 follows EP = 1 on the same batches)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ep_spawn import run_ranks

from xmoe.config import ConfigError, load_config
from xmoe.train.engine import deepspeed_config

BASE = ["train.dtype=bf16", "moe.dispatcher=pft", "train.global_batch=8", "train.micro_batch=2"]


def test_option_reaches_deepspeed_only_under_bf16():
    cpu = torch.device("cpu")
    fp32 = load_config("tiny", [*BASE, "train.grad_accum_dtype=fp32"])
    assert deepspeed_config(fp32, 2, cpu)["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "data_types" not in deepspeed_config(load_config("tiny", BASE), 2, cpu)
    plain = load_config("tiny", ["train.dtype=fp32", "train.grad_accum_dtype=fp32"])
    assert "data_types" not in deepspeed_config(plain, 2, cpu)  # already fp32
    with pytest.raises(ConfigError, match="train.grad_accum_dtype"):
        load_config("tiny", ["train.grad_accum_dtype=fp64"])
    with pytest.raises(ConfigError, match="not fp16"):
        load_config("tiny", ["train.dtype=fp16", "train.grad_accum_dtype=fp32"])


def _train(rank: int, world: int, ep: int, zero: int, out: str) -> None:
    from xmoe.data import build_train_data
    from xmoe.model import Transformer
    from xmoe.parallel.launch import setup_parallel
    from xmoe.train.engine import build_engine
    from xmoe.train.loop import seed_everything, train_step

    over = [*BASE, "train.grad_accum_dtype=fp32", f"parallel.ep={ep}"]
    cfg = load_config("tiny", over + [f"parallel.zero_stage={zero}", f"data.cache_dir={out}.c"])
    state = setup_parallel(cfg)
    seed_everything(cfg.train.seed)
    model = Transformer(cfg, state)
    engine = build_engine(cfg, model, state)
    data = build_train_data(cfg, state.dp_rank, state.dp)
    accum = engine.gradient_accumulation_steps()
    steps = [train_step(engine, data, model, accum) for _ in range(3)]
    if rank == 0:
        Path(out).write_text(
            json.dumps(
                {
                    "optimizer": type(engine.optimizer).__name__,
                    "losses": [r.loss for r in steps],
                    "norms": [r.grad_norm for r in steps],
                }
            )
        )


@pytest.mark.parametrize("zero", [1, 2])
def test_ep2_follows_ep1_with_fp32_accumulation(tmp_path, zero):
    runs = {}
    for ep in (1, 2):
        out = tmp_path / f"ep{ep}.json"
        run_ranks(2, _train, ep, zero, str(out))
        runs[ep] = json.loads(out.read_text())
    if zero == 1:
        assert runs[1]["optimizer"] == runs[2]["optimizer"] == "BF16_Optimizer"
    assert runs[1]["losses"][0] == pytest.approx(runs[2]["losses"][0], rel=1e-3)
    # bf16 forward passes: the two layouts round differently, not by more than this; an
    # expert gradient reduced over the wrong ranks moves the norms by far more
    assert runs[2]["losses"] == pytest.approx(runs[1]["losses"], rel=2e-2)
    assert runs[2]["norms"] == pytest.approx(runs[1]["norms"], rel=5e-2)
    assert runs[1]["losses"][-1] < runs[1]["losses"][0]
