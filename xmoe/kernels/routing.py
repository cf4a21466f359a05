"""Routing metadata: where each routed (token, k) assignment goes in the expert-grouped buffer.

From the router's top-k expert ids (and the capacity keep-mask, if dropping) this computes
  offsets_E       int32 end row of each expert's rows (the inclusive sum of the kept
                  assignments per expert, `counts_E`), as the grouped GEMM takes them,
  dest_row_TK     the row of each assignment in the expert-grouped buffer (-1 = dropped),
  src_slot_R      the inverse: for each row, the flat assignment index t * K + k.
Rows are ordered by expert, and inside an expert by flat assignment index (a stable order),
so every backend produces bit-identical metadata.

The Triton path needs no sort: a per-block one-hot histogram gives counts, a tiny torch
cumsum over the [E, blocks] histogram gives each block's end row per expert (each
expert's last block's is the expert's end row, which the last block's program writes
out as the offsets), and a second pass ranks each assignment inside its block with a
cumsum over the one-hot tile. Exact for any token count (int64
positions, no floating-point ranking). The torch reference uses a stable argsort and
bincount.

Nothing here syncs with the host: `src_slot_R` is returned with room for every assignment
and only its first `counts_E.sum()` entries are meaningful; the caller slices it once the
counts are on the host (the one sync per layer).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from xmoe.kernels.backend import HAVE_TRITON, kernel, next_pow2, use_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @kernel(rows=("N", "NB"))
    def _block_histogram_kernel(
        ids_ptr,
        keep_ptr,
        hist_ptr,
        N,
        E,
        NB,
        FIRST,
        HAS_KEEP: tl.constexpr,
        BLOCK: tl.constexpr,
        E_PAD: tl.constexpr,
    ):
        b = tl.program_id(0)
        i = b * BLOCK + tl.arange(0, BLOCK)
        m = i < N
        ids = tl.load(ids_ptr + i, mask=m, other=-1) - FIRST
        ids = tl.where((ids >= 0) & (ids < E), ids, -1)  # outside the window: not kept
        if HAS_KEEP:
            keep = tl.load(keep_ptr + i, mask=m, other=0)
            ids = tl.where(keep != 0, ids, -1)
        e = tl.arange(0, E_PAD)
        onehot = (ids[:, None] == e[None, :]).to(tl.int32)
        tl.store(hist_ptr + e * NB + b, tl.sum(onehot, axis=0), mask=e < E)  # [E, NB]

    @kernel(rows=("N", "NB"))
    def _positions_kernel(
        ids_ptr,
        keep_ptr,
        hist_ptr,
        ends_ptr,
        dest_ptr,
        slot_ptr,
        offs_ptr,
        N,
        E,
        NB,
        FIRST,
        HAS_KEEP: tl.constexpr,
        BLOCK: tl.constexpr,
        E_PAD: tl.constexpr,
    ):
        b = tl.program_id(0)
        i = b * BLOCK + tl.arange(0, BLOCK)
        m = i < N
        ids = tl.load(ids_ptr + i, mask=m, other=-1) - FIRST
        ids = tl.where((ids >= 0) & (ids < E), ids, -1)  # outside the window: not kept
        if HAS_KEEP:
            keep = tl.load(keep_ptr + i, mask=m, other=0)
            ids = tl.where(keep != 0, ids, -1)
        e = tl.arange(0, E_PAD)
        # rank inside the block among the same expert's assignments: int32 (a block is
        # small), the expert's base row for this block gathered as int64
        onehot = (ids[:, None] == e[None, :]).to(tl.int32)
        rank = tl.sum(onehot * tl.cumsum(onehot, axis=0), axis=1) - 1
        valid = m & (ids >= 0)
        eb = tl.where(valid, ids, 0).to(tl.int64) * NB + b
        base = tl.load(ends_ptr + eb, mask=valid) - tl.load(hist_ptr + eb, mask=valid)
        pos = tl.where(valid, base + rank.to(tl.int64), -1)
        tl.store(dest_ptr + i, pos, mask=m)
        tl.store(slot_ptr + pos, i.to(tl.int64), mask=valid)
        if b == NB - 1:  # each expert's end row: its last block's
            ends = tl.load(ends_ptr + e.to(tl.int64) * NB + b, mask=e < E)
            tl.store(offs_ptr + e, ends.to(tl.int32), mask=e < E)


def count_ids(ids_N: torch.Tensor, size: int) -> torch.Tensor:
    """int64 occurrences of each id in [0, size): `torch.bincount` without its host sync.

    CUDA's bincount reads the largest id back to the host to size its output; the router
    and the dispatchers run on the step's critical path, where the dispatcher's counts
    copy is the one host sync a layer may make.
    """
    ids_N = ids_N.reshape(-1).long()
    counts = torch.zeros(size, dtype=torch.int64, device=ids_N.device)
    return counts.scatter_add_(0, ids_N, torch.ones_like(ids_N))


@dataclass
class RoutingMeta:
    offsets_E: torch.Tensor  # int32, end row of each expert's rows (inclusive sum of counts_E)
    dest_row_TK: torch.Tensor  # int64, row in the expert-grouped buffer, -1 where dropped
    src_slot_N: torch.Tensor  # int64 [T*K], first counts_E.sum() entries: flat (t*K+k) per row
    top_k: int

    @functools.cached_property
    def counts_E(self) -> torch.Tensor:
        """int64 kept assignments per expert (made on first use: the grouped GEMM takes
        `offsets_E`, so dropless on one rank nothing needs it)."""
        ends = self.offsets_E.long()
        return torch.diff(ends, prepend=ends.new_zeros(1))

    def counts_per_rank(self, world: int) -> torch.Tensor:
        """Rows destined to each of `world` expert-parallel ranks (experts split evenly)."""
        return self.counts_E.view(world, -1).sum(1)


def routing_metadata_torch(
    topk_ids_TK: torch.Tensor, keep_TK: torch.Tensor | None, num_experts: int, first: int = 0
) -> RoutingMeta:
    """Reference: stable argsort of expert ids (dropped assignments sort last) and bincount."""
    T, K = topk_ids_TK.shape
    key_N = topk_ids_TK.reshape(-1).long() - first
    key_N = torch.where((key_N >= 0) & (key_N < num_experts), key_N, num_experts)
    if keep_TK is not None:
        key_N = torch.where(keep_TK.reshape(-1), key_N, num_experts)
    order_N = torch.sort(key_N, stable=True).indices
    counts_E = torch.bincount(key_N, minlength=num_experts + 1)[:num_experts]
    dest_N = torch.empty_like(order_N)
    dest_N[order_N] = torch.arange(order_N.numel(), device=order_N.device)
    dest_N = torch.where(key_N < num_experts, dest_N, -1)
    return RoutingMeta(torch.cumsum(counts_E, 0).to(torch.int32), dest_N.view(T, K), order_N, K)


def routing_metadata_triton(
    topk_ids_TK: torch.Tensor,
    keep_TK: torch.Tensor | None,
    num_experts: int,
    first: int = 0,
    all_kept: bool = False,
) -> RoutingMeta:
    T, K = topk_ids_TK.shape
    N, E = T * K, num_experts
    dev = topk_ids_TK.device
    ids_N = topk_ids_TK.reshape(-1).contiguous()
    keep_N = keep_TK.reshape(-1).contiguous().view(torch.uint8) if keep_TK is not None else ids_N
    e_pad = max(16, next_pow2(E))
    block = max(16, min(1024, 16384 // e_pad))
    nb = max(1, triton.cdiv(N, block))
    dest_N = torch.empty(N, dtype=torch.int64, device=dev)
    # all kept: every slot is written, no zero fill (else the unwritten tail stays valid)
    slot_N = (torch.empty if all_kept else torch.zeros)(N, dtype=torch.int64, device=dev)
    if N == 0:
        return RoutingMeta(
            torch.zeros(E, dtype=torch.int32, device=dev), dest_N.view(T, K), slot_N, K
        )
    has_keep = keep_TK is not None
    # kept assignments per (expert, block), expert-major: every entry is written
    hist_EB = torch.empty(E, nb, dtype=torch.int64, device=dev)
    _block_histogram_kernel[(nb,)](
        ids_N, keep_N, hist_EB, N, E, nb, first, HAS_KEEP=has_keep, BLOCK=block, E_PAD=e_pad
    )
    # rows are grouped by expert, then by block: block b's rows for expert e end at the
    # inclusive prefix sum of the histogram in that order (one scan), and start its own
    # count before that
    ends_EB = torch.cumsum(hist_EB.view(-1), 0)
    offsets_E = torch.empty(E, dtype=torch.int32, device=dev)
    _positions_kernel[(nb,)](
        ids_N, keep_N, hist_EB, ends_EB, dest_N, slot_N, offsets_E, N, E, nb, first,
        HAS_KEEP=has_keep, BLOCK=block, E_PAD=e_pad,
    )  # fmt: skip
    return RoutingMeta(offsets_E, dest_N.view(T, K), slot_N, K)


def routing_metadata(
    topk_ids_TK: torch.Tensor,
    keep_TK: torch.Tensor | None,
    num_experts: int,
    first: int = 0,
    all_kept: bool = False,
) -> RoutingMeta:
    """Counts per expert and each kept assignment's row in the expert-grouped buffer.

    `first`: the experts are ids first .. first + num_experts - 1 (one rank's window of
    the global ids); an id outside the window, -1 included, counts as not kept.
    `all_kept`: the caller knows no assignment is dropped nor outside the window, so
    every entry of `src_slot_N` gets written (it is then not zero-filled first)."""
    if all_kept and keep_TK is not None:
        raise ValueError("routing_metadata: all_kept=True with a keep mask")
    if use_triton(topk_ids_TK):
        return routing_metadata_triton(topk_ids_TK, keep_TK, num_experts, first, all_kept)
    return routing_metadata_torch(topk_ids_TK, keep_TK, num_experts, first)
