"""Sequence-parallel autograd collectives on 2 real gloo ranks: values and gradients.

Each function is checked against what autograd gives for the same computation written
out on one rank with the two ranks' tensors side by side.
"""

import torch
import torch.distributed as dist
from ep_spawn import run_ranks

from xmoe.parallel.tensor_parallel import (
    TPGroup,
    gather_replicated,
    gather_sequence,
    reduce_from_tp,
    reduce_scatter_sequence,
    scatter_replicated,
)


def _both(seed, shape):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(2)]


def _run(rank, world):
    tp = TPGroup(world, rank, dist.group.WORLD)
    # gather_sequence: forward concatenates, backward sums every rank's gradient of my rows
    xs, gs = _both(1, (3, 4)), _both(2, (6, 4))
    x = xs[rank].clone().requires_grad_()
    y = gather_sequence(x, tp)
    torch.testing.assert_close(y, torch.cat(xs))
    y.backward(gs[rank])
    torch.testing.assert_close(x.grad, (gs[0] + gs[1])[rank * 3 : rank * 3 + 3])

    # reduce_scatter_sequence: forward sums and keeps my rows, backward gathers the grads
    xs, gs = _both(3, (6, 4)), _both(4, (3, 4))
    x = xs[rank].clone().requires_grad_()
    y = reduce_scatter_sequence(x, tp)
    torch.testing.assert_close(y, (xs[0] + xs[1])[rank * 3 : rank * 3 + 3])
    y.backward(gs[rank])
    torch.testing.assert_close(x.grad, torch.cat(gs))

    # scatter_replicated (same input on both ranks): my rows; backward gathers
    full = _both(5, (6, 4))[0]
    x = full.clone().requires_grad_()
    y = scatter_replicated(x, tp)
    torch.testing.assert_close(y, full[rank * 3 : rank * 3 + 3])
    gs = _both(6, (3, 4))
    y.backward(gs[rank])
    torch.testing.assert_close(x.grad, torch.cat(gs))

    # gather_replicated: concatenates; backward keeps my rows of the (replicated) gradient
    xs = _both(7, (3, 4))
    x = xs[rank].clone().requires_grad_()
    y = gather_replicated(x, tp)
    torch.testing.assert_close(y, torch.cat(xs))
    g = _both(8, (6, 4))[0]
    y.backward(g)
    torch.testing.assert_close(x.grad, g[rank * 3 : rank * 3 + 3])

    # reduce_from_tp: sums the shares; each rank back-propagates its own share only
    xs = _both(9, (2,))
    x = xs[rank].clone().requires_grad_()
    y = reduce_from_tp(x * 3.0, tp)
    torch.testing.assert_close(y, 3.0 * (xs[0] + xs[1]))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((2,), 3.0, dtype=torch.float64))


def test_sequence_parallel_collectives():
    run_ranks(2, _run)
