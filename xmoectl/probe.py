"""The checks behind `xmoectl env check`, run as `python -m xmoectl.probe` in the environment.

This is the one xmoectl module that imports torch, Triton and DeepSpeed, and it only ever
runs as its own process. It prints one JSON line per check: name, ok, detail.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
from collections.abc import Callable


def _emit(name: str, ok: bool, detail: str) -> None:
    print(json.dumps({"name": name, "ok": ok, "detail": detail}), flush=True)


def _guard(name: str, fn: Callable[[], tuple[bool, str]]) -> None:
    try:
        ok, detail = fn()
    except Exception as e:  # noqa: BLE001 - every failure becomes a red line, never a traceback
        ok, detail = False, f"{type(e).__name__}: {e}"
    _emit(name, ok, detail)


def check_torch() -> tuple[bool, str]:
    import torch

    if torch.version.hip:
        build = f"ROCm {torch.version.hip}"
    elif torch.version.cuda:
        build = f"CUDA {torch.version.cuda}"
    else:
        build = "CPU build"
    return True, f"torch {torch.__version__} ({build})"


def check_devices() -> tuple[bool, str]:
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        ok = not (torch.version.cuda or torch.version.hip)
        return (
            ok,
            "no GPU visible: CPU ranks with gloo" if ok else "a GPU build of torch sees no GPU",
        )
    names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
    return True, f"{n} visible: {', '.join(names)}"


def check_comm_plugin(expect: bool) -> tuple[bool, str]:
    import torch

    if not torch.cuda.is_available():
        return True, "gloo on CPU (no NCCL/RCCL network plugin needed)"
    wanted = os.environ.get("NCCL_NET_PLUGIN", "")
    dirs = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    found = []
    for d in dirs:
        found += glob.glob(os.path.join(d, "libnccl-net*.so*")) + glob.glob(
            os.path.join(d, "librccl-net*.so*")
        )
    if wanted:
        found = [f for f in found if wanted in os.path.basename(f)] or found
    if found:
        return True, f"network plugin {found[0]}"
    return (
        not expect,
        "no libnccl-net/librccl-net on LD_LIBRARY_PATH: inter-node traffic falls back to sockets",
    )


def check_triton() -> tuple[bool, str]:
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        # must be set before the kernel is defined; the interpreter runs kernels on the CPU
        os.environ["TRITON_INTERPRET"] = "1"
    import triton
    import triton.language as tl

    @triton.jit
    def _add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(
            out_ptr + offs,
            tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask),
            mask=mask,
        )

    device = "cuda" if on_gpu else "cpu"
    x = torch.arange(1000, dtype=torch.float32, device=device)
    y = torch.ones_like(x)
    out = torch.empty_like(x)
    _add[(triton.cdiv(1000, 256),)](x, y, out, 1000, BLOCK=256)
    ok = bool(torch.equal(out.cpu(), (x + y).cpu()))
    how = "compiled on the GPU" if on_gpu else "interpreted on the CPU (TRITON_INTERPRET=1)"
    return (
        ok,
        f"triton {triton.__version__}: a kernel {how} {'gave' if ok else 'did not give'} the right sum",
    )


def check_caches() -> tuple[bool, str]:
    names = (
        "TRITON_CACHE_DIR",
        "TORCH_EXTENSIONS_DIR",
        "MIOPEN_USER_DB_PATH",
        "MIOPEN_CUSTOM_CACHE_DIR",
    )
    dirs = {n: os.environ[n] for n in names if os.environ.get(n)}
    if not dirs:
        dirs = {"~/.triton": os.path.expanduser("~/.triton/cache")}
    bad = []
    for name, d in dirs.items():
        try:
            os.makedirs(d, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=d):
                pass
        except OSError as e:
            bad.append(f"{name}={d} ({e.strerror})")
    if bad:
        return False, "not writable: " + "; ".join(bad)
    return True, "writable: " + ", ".join(f"{n}={d}" for n, d in dirs.items())


def check_deepspeed() -> tuple[bool, str]:
    import deepspeed

    return (
        True,
        f"deepspeed {deepspeed.__version__} (DS_BUILD_OPS=0 build: ops compile on first use only)",
    )


def check_xmoe() -> tuple[bool, str]:
    import xmoe

    return True, f"xmoe {xmoe.__version__} from {os.path.dirname(xmoe.__file__)}"


def main(argv: list[str]) -> int:
    expect_plugin = "--expect-plugin" in argv
    _guard("torch", check_torch)
    _guard("devices", check_devices)
    _guard("comm plugin", lambda: check_comm_plugin(expect_plugin))
    _guard("triton", check_triton)
    _guard("caches", check_caches)
    _guard("deepspeed", check_deepspeed)
    _guard("xmoe", check_xmoe)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
