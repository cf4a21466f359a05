"""Host syncs of one MoE layer: the dispatcher's counts copy is the only one per step.

A host sync (the CPU waiting for the GPU queue to drain) stalls the step; the design
allows one per MoE layer, the dispatcher's `.tolist()` of the expert counts. On CPU
nothing waits, so this test counts the operations that *would* sync on a GPU during one
forward + backward:
- explicit reads to the host: `.item()`, `bool()/int()/float()` of a tensor (all go through
  aten `_local_scalar_dense`), `.tolist()`, `.cpu()`, `.numpy()`;
- device ops whose output size or argument check CUDA reads back to the host: `nonzero`,
  `bincount`, `masked_select`, `unique*`, `repeat_interleave` without `output_size`,
  and indexing with a boolean mask.
The torch references in `xmoe.kernels` (functions named `*_torch`) are not counted: they
run only where no GPU is, and a GPU runs their Triton kernels instead.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from xmoe.config import load_config
from xmoe.moe.layer import MoELayer
from xmoe.moe.rbd_plan import NodeLayout, plan_sender
from xmoe.moe.router import Router

aten = torch.ops.aten
_SYNC_OPS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.bincount.default,
    aten.masked_select.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
}


def _where() -> str | None:
    """file:line of the innermost xmoe frame, or None when it is a CPU-only torch reference."""
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace("\\", "/")
        if "/xmoe/" in path and "/tests/" not in path:
            if "/xmoe/kernels/" in path and frame.name.endswith("_torch"):
                return None
            return f"{path.split('/xmoe/', 1)[1]}:{frame.lineno} ({frame.name})"
    return "outside xmoe"


class SyncCounter(TorchDispatchMode):
    """Records every would-be host sync (see the module doc) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def record(self, what: str) -> None:
        where = _where()
        if where is not None:
            self.syncs.append(f"{what} at {where}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNC_OPS:
            self.record(str(func))
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.record("repeat_interleave without output_size")
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
            if any(i is not None and i.dtype == torch.bool for i in indices):
                self.record(f"{func} with a boolean mask")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def count_syncs(monkeypatch):
    """Yield a SyncCounter factory; `.tolist/.cpu/.numpy` (which never reach the dispatcher
    for a CPU tensor) are wrapped to report to the active counter."""
    active: list[SyncCounter] = []

    def wrap(name):
        original = getattr(torch.Tensor, name)

        def reading(self, *a, **k):
            if active:
                active[-1].record(f"Tensor.{name}")
            return original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, reading)

    for name in ("tolist", "cpu", "numpy"):
        wrap(name)

    class Counting(SyncCounter):
        def __enter__(self):
            active.append(self)
            return super().__enter__()

        def __exit__(self, *exc):
            active.pop()
            return super().__exit__(*exc)

    return Counting


BASE = ["model.hidden=32", "moe.expert_hidden=16", "moe.num_shared_experts=1"]
# case -> (overrides, where the one sync is; None = no sync at all)
CASES = {
    # dropless on one rank every size is T*K: `_grouped_mm` runs on device offsets alone
    "pft_dropless": (["moe.dispatcher=pft", "moe.grouped_gemm=torch"], None),
    # a grouped GEMM that plans its tiles on the host reads the counts: the one sync
    "pft_dropless_loop": (
        ["moe.dispatcher=pft", "moe.grouped_gemm=loop"],
        "kernels/grouped_gemm.py",
    ),
    "pft_dropping": (["moe.dispatcher=pft", "moe.capacity_factor=0.6"], "moe/pft.py"),
    "pft_dropping_expert_bias": (
        ["moe.dispatcher=pft", "moe.capacity_factor=0.6", "moe.expert_bias=true"],
        "moe/pft.py",
    ),
    "rbd_dropping": (["moe.dispatcher=rbd", "moe.capacity_factor=0.6"], "moe/pft.py"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_host_sync_per_moe_layer(case, count_syncs):
    """Budget: at most one sync for forward + backward, the dispatcher's counts copy."""
    overrides, where = CASES[case]
    torch.manual_seed(0)
    layer = MoELayer(load_config("tiny", [*BASE, *overrides]))
    x = torch.randn(40, 32, requires_grad=True)
    with count_syncs() as counter:
        y = layer(x)
        loss = y.square().sum() + layer.last_aux_loss + layer.last_z_loss
        loss.backward()
    if where is None:
        assert counter.syncs == []
    else:
        assert len(counter.syncs) == 1, counter.syncs
        assert counter.syncs[0].startswith(f"Tensor.tolist at {where}"), counter.syncs
    assert x.grad is not None and layer.router.weight_ED.grad is not None
    # the statistics stay on the device until the loop logs them
    stats = layer.last_stats
    assert torch.is_tensor(stats["dropped_fraction"])
    assert torch.is_tensor(stats["tokens_per_expert"])
    if "moe.capacity_factor=0.6" in overrides:
        assert 0 < float(stats["dropped_fraction"]) < 1


def test_counter_sees_the_syncs_it_must_catch(count_syncs):
    """The counter itself can fail: each kind of read-back it promises to see is seen."""
    t = torch.arange(6)
    with count_syncs() as counter:
        t.sum().item()
        bool(t.any())
        t.tolist()
        t.nonzero()
        torch.bincount(t)
        t[t > 2]
        torch.repeat_interleave(t, t)
        torch.repeat_interleave(t, t, output_size=15)  # sized: no sync
        t.cpu()
    assert len(counter.syncs) == 8, counter.syncs


def test_router_update_and_node_limited_routing_do_not_sync(count_syncs):
    cfg = load_config("tiny", ["moe.num_experts=8", "moe.top_k=3", "moe.expert_bias=true"]).moe
    cfg.max_nodes_per_token = 2
    router = Router(cfg, 32)
    router.experts_per_node = 2
    with count_syncs() as counter:
        out = router(torch.randn(20, 32))
        router.update_expert_bias(out.tokens_per_expert_E)
        router.update_expert_bias(torch.zeros(8, dtype=torch.long))
    assert counter.syncs == []
    assert int(router.bias_steps_E.abs().sum()) > 0


def test_rbd_sender_plan_does_not_sync(count_syncs):
    """The multi-node RBD path's sender plan (its own host copy is the counts message)."""
    layout = NodeLayout(4, 2, 2, 1)  # 4 EP ranks, 2 per node, 2 experts each; this is rank 1
    g = torch.Generator().manual_seed(0)
    ids_TK = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(10)])
    keep_TK = torch.rand(10, 3, generator=g) > 0.3
    with count_syncs() as counter:
        plan = plan_sender(ids_TK, keep_TK, layout)
    assert counter.syncs == []
    counts_E = plan.msg_WC.view(2, 2, -1)[:, :, :2].reshape(-1)
    assert torch.equal(counts_E, torch.bincount(ids_TK[keep_TK], minlength=8))


def test_setup_frozen_keeps_setup_objects_out_of_full_collections():
    """The training loop's other host stall: Python's full collections. Inside
    `setup_frozen` the objects made before it are not scanned; new cyclic garbage is still
    collected, and on exit the frozen objects are handed back."""
    import gc

    from xmoe.train.loop import setup_frozen

    setup = [[i] for i in range(20000)]  # stands for the model, torch and DeepSpeed
    before = gc.get_freeze_count()
    with setup_frozen():
        assert gc.get_freeze_count() >= before + len(setup)
        cycle: list = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1  # garbage the steps make is still freed
        # a full collection now scans only what was made inside (not the 20000 lists)
        assert sum(gc.get_count()) < 1000 and len(gc.get_objects(2)) < len(setup)
    assert gc.get_freeze_count() == 0
    assert len(setup) == 20000
