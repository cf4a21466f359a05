"""Uneven all-to-all and the counts exchange on 2 and 4 real gloo ranks, incl. empty sends."""

import pytest
import torch
from ep_spawn import run_ranks

from xmoe.parallel import collectives
from xmoe.parallel.collectives import all_reduce_host, all_to_all_uneven, exchange_counts

D = 3


def _split_matrices(world: int) -> list[list[list[int]]]:
    """S[i][j] = rows rank i sends to rank j: ragged, a rank sending nothing, a rank
    receiving nothing, and everything empty."""
    g = torch.Generator().manual_seed(world)
    ragged = torch.randint(0, 4, (world, world), generator=g)
    no_send = ragged.clone()
    no_send[0] = 0
    no_recv = ragged.clone() + 1
    no_recv[:, world - 1] = 0
    only_self = torch.diag(torch.arange(world) + 1)
    return [
        m.tolist()
        for m in (ragged, no_send, no_recv, only_self, torch.zeros(world, world, dtype=torch.long))
    ]


def _rows(src: int, dst: int, n: int) -> torch.Tensor:
    """Rows that say where they come from: (src, dst, index) in the first three columns."""
    i = torch.arange(n, dtype=torch.float32)
    return torch.stack([torch.full((n,), float(src)), torch.full((n,), float(dst)), i], 1)


def _check_exchange(rank: int, world: int) -> None:
    for S in _split_matrices(world):
        send = S[rank]
        recv = [S[j][rank] for j in range(world)]
        x = torch.cat([_rows(rank, j, send[j]) for j in range(world)]).requires_grad_()
        out = all_to_all_uneven(x, send, recv)
        want = torch.cat([_rows(j, rank, recv[j]) for j in range(world)])
        assert torch.equal(out, want), (S, rank, out, want)
        # d/dout of sum(out^2)/2 is out itself, so the gradient returning home equals x.
        (out * out).sum().mul(0.5).backward()
        assert torch.equal(x.grad, x.detach()), (S, rank)

    E_local = 2
    counts_E = torch.arange(world * E_local) * 10 + rank
    got = exchange_counts(counts_E)
    want = torch.stack([torch.arange(world * E_local) * 10 + j for j in range(world)])
    want = want[:, rank * E_local : (rank + 1) * E_local]
    assert torch.equal(got, want)


@pytest.mark.parametrize("world", [2, 4])
def test_uneven_all_to_all(world):
    run_ranks(world, _check_exchange)


def test_single_rank_is_identity():
    x = torch.randn(5, D)
    assert all_to_all_uneven(x, [5], [5]) is x
    assert exchange_counts(torch.tensor([1, 2])).tolist() == [[1, 2]]


def _check_host_reduce(rank: int, world: int) -> None:
    t = torch.tensor([float(rank), 1.0], dtype=torch.float64)
    out = all_reduce_host(t)
    assert out.device.type == "cpu"
    assert out.tolist() == [sum(range(world)), float(world)]
    assert t.tolist() == [float(rank), 1.0]  # the input stays as it was


def test_all_reduce_of_host_metrics():
    run_ranks(2, _check_host_reduce)


def test_host_tensors_go_through_the_gpu_under_nccl(monkeypatch):
    """NCCL refuses host tensors: the training loop's metrics are moved to the GPU for it."""
    monkeypatch.setattr(collectives.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(collectives.dist, "get_backend", lambda group=None: "gloo")
    assert collectives.collective_device() == torch.device("cpu")
