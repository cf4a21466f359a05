"""When the Triton kernels run, and when their plain-torch references run instead.

One rule for every kernel in this package: Triton runs when the tensor lives on a GPU, or
when `TRITON_INTERPRET=1` is set (the CPU interpreter the tests use). Everywhere else
(the CPU trainer in CI, the local demo) the torch reference beside each kernel runs, so
the same code path works with or without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is a dependency, but keep CPU usable
    HAVE_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """True when the Triton kernel should handle `t` (GPU tensor, or the CPU interpreter)."""
    if not HAVE_TRITON:
        return False
    return t.is_cuda or interpreting()


class Kernel:
    """A Triton kernel, compiled for the GPU or run by the CPU interpreter as decided per launch.

    `triton.jit` fixes the choice when the module is imported; deciding at launch keeps the
    rule above true whatever was imported first (e.g. in one pytest process).
    """

    # a list inside `record_launches()`: (kernel, args, kwargs) of each interpreted launch
    launches: list | None = None

    def __init__(self, fn, do_not_specialize: tuple[str, ...] = ()):
        self.fn = fn
        self.do_not_specialize = list(do_not_specialize)
        self._compiled = None
        self._interpreted = None

    def __getitem__(self, grid):
        if interpreting():
            if self._interpreted is None:
                from triton.runtime.interpreter import InterpretedFunction

                self._interpreted = InterpretedFunction(self.fn)
            launch = self._interpreted[grid]
            if Kernel.launches is None:
                return launch

            def recorded(*args, **kwargs):
                Kernel.launches.append((self, args, kwargs))
                return launch(*args, **kwargs)

            return recorded
        if self._compiled is None:
            from triton.runtime.jit import JITFunction

            self._compiled = JITFunction(self.fn, do_not_specialize=self.do_not_specialize)
        return self._compiled[grid]


def kernel(fn=None, *, rows: tuple[str, ...] = ()):
    """Decorator used instead of `triton.jit` for the kernels of this package.

    `rows`: integer arguments that count rows (tokens, routed rows, pilots). Triton
    compiles a variant per value class of an integer argument (1, a multiple of 16,
    other); row counts change from call to call under expert parallelism, so they are
    not specialised, and a new count never stalls a step for a compile."""
    if fn is None:
        return lambda f: Kernel(f, rows)
    return Kernel(fn, rows)


if HAVE_TRITON:
    from triton.runtime.jit import JITFunction

    class DeviceFunction(JITFunction):
        """A Triton function that kernels call (`triton.jit` on a helper), run the way the
        calling kernel runs: compiled into it, or by the interpreter when the caller is
        interpreted. `triton.jit` fixes that choice at import, and a compiled helper
        refuses calls from an interpreted kernel, so helpers are made with `device`."""

        def __call__(self, *args, **kwargs):
            if not interpreting():
                return super().__call__(*args, **kwargs)
            if getattr(self, "_interpreted", None) is None:
                from triton.runtime.interpreter import InterpretedFunction

                self._interpreted = InterpretedFunction(self.fn)
            return self._interpreted(*args, **kwargs)


def device(fn):
    """Decorator used instead of `triton.jit` for the helper functions kernels call."""
    return DeviceFunction(fn)


@contextlib.contextmanager
def record_launches() -> Iterator[list]:
    """Collect (kernel, args, kwargs) of every kernel the interpreter runs inside the
    block (the tests compile those launches for GPU targets)."""
    Kernel.launches = []
    try:
        yield Kernel.launches
    finally:
        Kernel.launches = None


def host_to_device(values: list[int], device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A small host list as a device tensor without stalling the host: a copy from
    pageable memory waits for the GPU queue to drain, one from pinned memory does not."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the torch references: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def split_rows(n: int, device: torch.device, granule: int = 1) -> tuple[int, int]:
    """(programs, rows per program) spreading n >= 1 rows over about four programs per
    multiprocessor, each program a multiple of `granule` rows: the layout of kernels
    whose programs add their rows into per-program partial sums (summed afterwards in a
    fixed order, so the result is deterministic). The interpreter counts 4
    multiprocessors: a few programs, several rows each."""
    sms = multiprocessors(device) if device.type == "cuda" else 4
    programs = max(1, min(cdiv(n, granule), 4 * sms))
    rows = cdiv(cdiv(n, programs), granule) * granule
    return cdiv(n, rows), rows


@functools.cache
def _device_facts(index: int) -> tuple[int, tuple[int, int]]:
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, (props.major, props.minor)


def multiprocessors(device: torch.device) -> int:
    """The GPU's multiprocessor count, read once per device (launch paths ask per call)."""
    return _device_facts(_index(device))[0]


def capability(device: torch.device) -> tuple[int, int]:
    """The GPU's compute capability, read once per device."""
    return _device_facts(_index(device))[1]


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def cdiv(a: int, b: int) -> int:
    """Integer ceil(a / b) on the host."""
    return -(-a // b)
