"""Routed experts as stacked weights `[E_local, ...]` fed to one grouped matmul.

Shape legend as in `xmoe.moe.dispatch`; weights are `[E, out, in]` like `nn.Linear`:
w1_EFD and w3_EFD map D -> F, w2_EDF maps F -> D. The grouped matmul is the one seam
where faster kernels plug in (`select_grouped_mm`); `loop` (one matmul per expert) is the
portable fallback every other variant is tested against.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

from xmoe.kernels.activation import scaled_activation
from xmoe.kernels.grouped_gemm import RowSource

# y_RY = grouped_mm(x_RX, w_EYX, counts_E, x_source=None): rows of group e (consecutive,
# counts_E[e] of them) are multiplied by w_EYX[e].T. Must be differentiable in x and w.
# `x_source` (a `RowSource`) lets backward rebuild x_RX rather than keep it; may be ignored.
GroupedMM = Callable[..., torch.Tensor]


def loop_grouped_mm(
    x_RX: torch.Tensor, w_EYX: torch.Tensor, counts_E: list[int], x_source: RowSource | None = None
) -> torch.Tensor:
    """One matmul per expert; empty experts still touch their weight so grads exist.
    Keeps x_RX for backward (it ignores `x_source`)."""
    outs = []
    start = 0
    for e, n in enumerate(counts_E):
        outs.append(x_RX[start : start + n] @ w_EYX[e].t())
        start += n
    if not outs:
        return x_RX.new_zeros(x_RX.shape[0], w_EYX.shape[1])
    return torch.cat(outs, dim=0)


def select_grouped_mm(kind: str) -> GroupedMM:
    """The grouped-GEMM implementation for `cfg.moe.grouped_gemm`.

    `loop` is implemented here. `auto`, `torch` and `triton` come from
    `xmoe.kernels.grouped_gemm.grouped_mm(x_RK, w_EKN, counts_E, impl)` (weights as
    [E, in, out], so ours go in as a transposed view) when that module exists; otherwise
    the loop is used.
    """
    if kind == "loop":
        return loop_grouped_mm
    try:
        from xmoe.kernels import grouped_gemm
    except ImportError:
        return loop_grouped_mm
    fn = getattr(grouped_gemm, "grouped_mm", None)
    if fn is None:
        return loop_grouped_mm

    def kernel_grouped_mm(
        x_RX: torch.Tensor,
        w_EYX: torch.Tensor,
        counts_E: list[int],
        x_source: RowSource | None = None,
    ) -> torch.Tensor:
        return fn(x_RX, w_EYX.transpose(1, 2), counts_E, kind, x_source)

    return kernel_grouped_mm


def _init_threads() -> int:
    """CPU cores this process may use for initialisation: its share of the node's
    (torchrun's OMP_NUM_THREADS=1 says nothing about the cores free at build time)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def mark_expert_params(module: nn.Module, ep_size: int) -> None:
    """Tag parameters with DeepSpeed's MoE conventions.

    `allreduce=False` + `group_name` make the engine reduce their gradients over the
    expert-data-parallel group `ep_size_{ep}` only, not the whole data-parallel group.
    """
    for p in module.parameters():
        p.allreduce = False
        p.group_name = f"ep_size_{ep_size}"


class GroupedExperts(nn.Module):
    """The routed experts held by this rank, applied to rows grouped by local expert."""

    def __init__(
        self,
        num_local_experts: int,
        hidden: int,
        expert_hidden: int,
        activation: str = "swiglu",
        init_std: float = 0.02,
        grouped_gemm: str = "loop",
        ep_size: int = 1,
        first_expert: int = 0,
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        self.num_local_experts = num_local_experts
        self.activation = activation
        E, D, F_ = num_local_experts, hidden, expert_hidden
        self.w1_EFD = nn.Parameter(torch.empty(E, F_, D))
        self.w3_EFD = nn.Parameter(torch.empty(E, F_, D)) if activation == "swiglu" else None
        self.w2_EDF = nn.Parameter(torch.empty(E, D, F_))
        self.reset_parameters(init_std, first_expert, init_seed)
        self._grouped_mm = select_grouped_mm(grouped_gemm)
        mark_expert_params(self, ep_size)

    @torch.no_grad()
    def reset_parameters(self, init_std: float, first_expert: int, init_seed: int) -> None:
        """Initialise each expert from its own seed (global expert id), not the global RNG.

        So expert e starts identical whatever the EP size, and building experts does not
        shift the random stream of the rest of the model: EP=n runs match EP=1 runs.
        Experts are independent streams, so on the CPU a pool of threads fills them in
        place (the generator is the bottleneck and runs without the GIL); the values do
        not depend on the thread count. Weights created on a GPU (built under
        `torch.device("cuda")`) are drawn there by per-expert GPU generators: as
        EP-independent, but not the CPU's values.
        """
        weights = [p for p in (self.w1_EFD, self.w3_EFD, self.w2_EDF) if p is not None]

        @torch.no_grad()  # grad mode is per thread
        def init_expert(i: int) -> None:
            gen = torch.Generator(weights[0].device)
            gen.manual_seed(init_seed * 1_000_003 + first_expert + i)
            for p in weights:
                p[i].normal_(0.0, init_std, generator=gen)

        workers = min(self.num_local_experts, _init_threads())
        if workers <= 1 or weights[0].device.type != "cpu":
            for i in range(self.num_local_experts):
                init_expert(i)
            return
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(init_expert, range(self.num_local_experts)))

    def grouped_mm(
        self,
        x_RX: torch.Tensor,
        w_EYX: torch.Tensor,
        counts_El: list[int],
        x_source: RowSource | None = None,
    ) -> torch.Tensor:
        """The seam: override or re-select to change how the grouped matmul runs."""
        return self._grouped_mm(x_RX, w_EYX, counts_El, x_source)

    def forward(
        self,
        x_RD: torch.Tensor,
        counts_El: list[int],
        weights_R: torch.Tensor | None = None,
        x_source: RowSource | None = None,
    ) -> torch.Tensor:
        """Expert outputs of each row; with `weights_R`, each row's output is scaled by
        its combine weight (folded into the activation: `xmoe.kernels.activation`).
        With `x_source` the first GEMM(s) rebuild x_RD in backward instead of keeping it."""
        return self.project(self.hidden(x_RD, counts_El, weights_R, x_source), counts_El)

    def hidden(
        self,
        x_RD: torch.Tensor,
        counts_El: list[int],
        weights_R: torch.Tensor | None = None,
        x_source: RowSource | None = None,
    ) -> torch.Tensor:
        """The first half of `forward`: the activations a_RF that `project` maps back to D."""
        if len(counts_El) != self.num_local_experts:
            raise ValueError(
                f"got counts for {len(counts_El)} experts, hold {self.num_local_experts}"
            )
        h_RF = self.grouped_mm(x_RD, self.w1_EFD, counts_El, x_source)
        h3_RF = None
        if self.w3_EFD is not None:
            h3_RF = self.grouped_mm(x_RD, self.w3_EFD, counts_El, x_source)
        if weights_R is not None:
            return scaled_activation(h_RF, h3_RF, weights_R)
        if h3_RF is not None:
            return F.silu(h_RF) * h3_RF
        return F.gelu(h_RF)

    def project(self, a_RF: torch.Tensor, counts_El: list[int]) -> torch.Tensor:
        """The second half of `forward`: the last grouped matmul, F -> D."""
        return self.grouped_mm(a_RF, self.w2_EDF, counts_El)


class DenseMLP(nn.Module):
    """A plain SwiGLU (or GELU) MLP: the dense layers' FFN and the shared experts."""

    def __init__(
        self, hidden: int, ffn_hidden: int, activation: str = "swiglu", init_std: float = 0.02
    ) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn_hidden, bias=False)
        self.w3 = nn.Linear(hidden, ffn_hidden, bias=False) if activation == "swiglu" else None
        self.w2 = nn.Linear(ffn_hidden, hidden, bias=False)
        for p in self.parameters():
            nn.init.normal_(p, std=init_std)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        h = self.w1(x_TD)
        h = F.silu(h) * self.w3(x_TD) if self.w3 is not None else F.gelu(h)
        return self.w2(h)
