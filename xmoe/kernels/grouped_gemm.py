"""Grouped GEMM over expert-grouped rows: y_RN[rows of e] = x_RK[rows of e] @ w_EKN[e].

Three interchangeable implementations, all differentiable in x and w:
  "torch"   torch._grouped_mm (CUTLASS on Hopper; offs = int32 cumsum of the counts).
  "triton"  the kernels of `grouped_gemm_triton`: the path where _grouped_mm has no
            bf16 (ROCm gfx90a, i.e. Frontier's MI250X) or does not exist.
  "loop"    one matmul per expert: the reference the other two are tested against.
`w_EKN` may be any strided view (e.g. `w1_EFD.transpose(1, 2)`), so stacked parameters
stored [E, out, in] feed in without a copy. `counts_E` is a host list (the dispatcher
already synced it), a tensor, or a `DeviceCounts` (read by the loop and Triton only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from xmoe.kernels import grouped_gemm_triton as T
from xmoe.kernels.backend import capability, host_to_device, use_triton

IMPLS = ("auto", "torch", "triton", "loop")


class CountsWithOffsets(list):
    """Host counts per expert that also carry `offsets`, their int32 cumulative sum already
    on the device (computed there from device counts before the host had them), so
    `_grouped_mm` needs no host-to-device copy after the dispatcher's host sync."""

    def __init__(self, counts: list[int], offsets: torch.Tensor) -> None:
        super().__init__(counts)
        self.offsets = offsets


class DeviceCounts(Sequence):
    """Counts per expert that live on the device as `offsets` (their int32 cumulative
    sum): all `_grouped_mm` needs, so a dispatcher whose buffer sizes are known without
    the counts (dropless on one rank) makes no host sync. Reading the values (the loop
    and Triton kernels do, to plan their tiles) copies the offsets to the host once."""

    def __init__(self, offsets: torch.Tensor) -> None:
        self.offsets = offsets
        self._host: list[int] | None = None

    @property
    def fetched(self) -> bool:
        return self._host is not None

    def host(self) -> list[int]:
        if self._host is None:
            ends = [int(c) for c in self.offsets.tolist()]
            self._host = [b - a for a, b in zip([0, *ends[:-1]], ends)]
        return self._host

    def __len__(self) -> int:
        return self.offsets.numel()

    def __getitem__(self, i):
        return self.host()[i]

    def __eq__(self, other) -> bool:
        return list(self.host()) == list(other)

    def __repr__(self) -> str:
        return f"DeviceCounts({self.host() if self.fetched else 'not fetched'})"


def _counts_list(counts_E) -> list[int]:
    if isinstance(counts_E, DeviceCounts):
        return counts_E.host()
    return [int(c) for c in (counts_E.tolist() if torch.is_tensor(counts_E) else counts_E)]


# --------------------------------------------------------------------------- autograd


class _Ops(NamedTuple):
    """One implementation's three products: y = x·w, dx = dy·wᵀ, dw = xᵀ·dy per expert."""

    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    dgrad: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    wgrad: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _InputGrad(torch.autograd.Function):
    """y = x·w; its backward gives dx only. Keeps w, not x."""

    @staticmethod
    def forward(ctx, x_RK, w_EKN, ops):
        ctx.ops = ops
        ctx.save_for_backward(w_EKN)
        return ops.forward(x_RK, w_EKN)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_RN):
        (w_EKN,) = ctx.saved_tensors
        dx = ctx.ops.dgrad(dy_RN.contiguous(), w_EKN) if ctx.needs_input_grad[0] else None
        return dx, None, None


class RowSource(NamedTuple):
    """How to rebuild a grouped GEMM's input rows in backward instead of keeping them:
    `rebuild(*tensors)` (e.g. a gather of the layer's input, which autograd keeps anyway)."""

    tensors: tuple[torch.Tensor, ...]
    rebuild: Callable[..., torch.Tensor]


class _WeightGrad(torch.autograd.Function):
    """The identity on y; its backward gives dw from x, which only this node keeps (or
    rebuilds from a `RowSource`: then it keeps the source's tensors)."""

    @staticmethod
    def forward(ctx, y_RN, w_EKN, ops, rebuild, *x_parts):
        ctx.ops, ctx.rebuild = ops, rebuild
        ctx.save_for_backward(*x_parts)
        return y_RN.view_as(y_RN)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_RN):
        parts = ctx.saved_tensors
        dw = None
        if ctx.needs_input_grad[1]:
            x_RK = ctx.rebuild(*parts) if ctx.rebuild is not None else parts[0]
            dw = ctx.ops.wgrad(x_RK, dy_RN.contiguous())
        return (dy_RN, dw, None, None, *(None for _ in parts))


def _split_grad(
    x_RK: torch.Tensor, w_EKN: torch.Tensor, ops: _Ops, x_source: RowSource | None = None
) -> torch.Tensor:
    """y = x·w as two autograd nodes, so backward frees x before it computes dx.

    Autograd releases a node's saved tensors only once its backward returns; one node
    computing both gradients keeps x (the expert input: [rows, F] for the second GEMM)
    alive beside dx, of the same size. Here the node nearer the output computes dw and
    is then released, dropping x, before the other node computes dx from dy and w.
    With `x_source` x is not kept at all: dw is computed from rows rebuilt in backward.
    """
    if not (torch.is_grad_enabled() and w_EKN.requires_grad):
        return _InputGrad.apply(x_RK, w_EKN, ops)
    y_RN = _InputGrad.apply(x_RK, w_EKN.detach(), ops)
    if x_source is not None:
        return _WeightGrad.apply(y_RN, w_EKN, ops, x_source.rebuild, *x_source.tensors)
    return _WeightGrad.apply(y_RN, w_EKN, ops, None, x_RK.detach())


# --------------------------------------------------------------------------- loop / torch


def grouped_mm_loop(x_RK: torch.Tensor, w_EKN: torch.Tensor, counts_E) -> torch.Tensor:
    """Reference: one matmul per expert."""
    counts = _counts_list(counts_E)
    outs = list(torch.split(x_RK, counts, dim=0))
    outs = [xe @ w_EKN[e] for e, xe in enumerate(outs)]
    if not outs:
        return x_RK.new_zeros(x_RK.shape[0], w_EKN.shape[2])
    return torch.cat(outs, dim=0)


def _offsets(x_RK: torch.Tensor, counts_E) -> torch.Tensor:
    """int32 end row of each expert on x's device, as _grouped_mm takes them."""
    offsets = getattr(counts_E, "offsets", None)
    if offsets is not None and offsets.device == x_RK.device:
        return offsets
    if torch.is_tensor(counts_E):
        return torch.cumsum(counts_E.to(device=x_RK.device), 0).to(torch.int32)
    ends, total = [], 0
    for c in _counts_list(counts_E):
        total += c
        ends.append(total)
    return host_to_device(ends, x_RK.device, torch.int32)


def _torch_wgrad(x_RK, dy_RN, offs, w_EKN) -> torch.Tensor:
    """dw = xᵀ·dy per expert, laid out as w_EKN is: a transposed view of a [E, N, K]
    parameter gets the transpose of a contiguous [E, N, K] result, so the gradient
    reaches the parameter without a layout copy."""
    if w_EKN.stride(1) == 1 and w_EKN.stride(2) != 1:
        return torch._grouped_mm(dy_RN.t(), x_RK, offs=offs).transpose(1, 2)
    return torch._grouped_mm(x_RK.t(), dy_RN, offs=offs)


def grouped_mm_torch(
    x_RK: torch.Tensor, w_EKN: torch.Tensor, counts_E, x_source: RowSource | None = None
) -> torch.Tensor:
    """torch._grouped_mm, its gradients split so the weight's comes first (`_split_grad`)."""
    offs = _offsets(x_RK, counts_E)
    return _split_grad(
        x_RK,
        w_EKN,
        _Ops(
            forward=lambda x, w: torch._grouped_mm(x, w, offs=offs),
            dgrad=lambda dy, w: torch._grouped_mm(dy, w.transpose(1, 2), offs=offs),
            wgrad=lambda x, dy: _torch_wgrad(x, dy, offs, w_EKN),
        ),
        x_source,
    )


def torch_grouped_mm_supported(x_RK: torch.Tensor, w_EKN: torch.Tensor) -> bool:
    """Whether torch._grouped_mm handles these operands here (exists, dtype, alignment)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x_RK.is_cuda:
        if x_RK.dtype != torch.bfloat16 or torch.version.hip is not None:
            return False
        if capability(x_RK.device)[0] < 9:
            return False
    elif x_RK.dtype != torch.float32:
        return False
    align = 16 // x_RK.element_size()
    return x_RK.shape[1] % align == 0 and w_EKN.shape[2] % align == 0


# --------------------------------------------------------------------------- triton


def grouped_mm_triton(
    x_RK: torch.Tensor, w_EKN: torch.Tensor, counts_E, x_source: RowSource | None = None
) -> torch.Tensor:
    counts = _counts_list(counts_E)
    if sum(counts) != x_RK.shape[0]:
        # rows past the last expert's would be left as the empty output buffer held them
        raise ValueError(
            f"grouped_mm: counts_E sum to {sum(counts)} rows but x_RK has {x_RK.shape[0]}"
        )
    bm = T.config(x_RK.dtype, not x_RK.is_cuda)[0]
    tiles = T.tile_map(counts, bm, x_RK.device)
    E, K, N = w_EKN.shape
    return _split_grad(
        x_RK,
        w_EKN,
        _Ops(
            forward=lambda x, w: T.gmm_forward(x, w, tiles, N),
            dgrad=lambda dy, w: T.gmm_forward(dy, w.transpose(1, 2), tiles, K),
            wgrad=lambda x, dy: T.gmm_wgrad(x, dy, tiles[2], E, like=w_EKN),
        ),
        x_source,
    )


# --------------------------------------------------------------------------- selection


def resolve_impl(impl: str, x_RK: torch.Tensor, w_EKN: torch.Tensor) -> str:
    """The implementation that runs for `impl` on these operands.

    "auto" picks _grouped_mm where it works, else Triton on a GPU (or the interpreter),
    else the loop. An explicit choice the device cannot run degrades the same way
    ("torch" -> "triton" -> "loop"), so one config runs on the GPU and on CPU alike.
    """
    if impl not in IMPLS:
        raise ValueError(f"grouped GEMM impl {impl!r} is not one of {', '.join(IMPLS)}")
    if impl in ("auto", "torch") and torch_grouped_mm_supported(x_RK, w_EKN):
        return "torch"
    if impl in ("auto", "torch", "triton") and use_triton(x_RK):
        return "triton"
    return "loop"


def grouped_mm(
    x_RK: torch.Tensor,
    w_EKN: torch.Tensor,
    counts_E,
    impl: str = "auto",
    x_source: RowSource | None = None,
) -> torch.Tensor:
    """y_RN = x_RK @ w_EKN[e] for each expert's consecutive block of counts_E[e] rows.

    `x_source`: backward rebuilds x_RK from it for the weight gradient instead of keeping
    x_RK (the torch and Triton paths; the loop, a reference, keeps x_RK).
    """
    impl = resolve_impl(impl, x_RK, w_EKN)
    if impl == "torch":
        return grouped_mm_torch(x_RK, w_EKN, counts_E, x_source)
    if impl == "triton":
        return grouped_mm_triton(x_RK, w_EKN, counts_E, x_source)
    return grouped_mm_loop(x_RK, w_EKN, counts_E)
