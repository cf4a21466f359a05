"""Compile recorded Triton kernel launches for GPU targets, without a GPU.

    python tests/compile_kernels.py SPECS.json

SPECS.json: a list of {"module", "name" (a `backend.Kernel` or plain function there),
"signature", "constexprs", "options", "target": [vendor, arch, warp size]}. Run in a
fresh process: Triton must be imported without TRITON_INTERPRET (a process that
interprets kernels cannot compile them). Prints one line per failure and exits 1 if any.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton.language as tl  # noqa: E402


def broken(x_ptr, BLOCK: tl.constexpr):
    """Not valid Triton: `tl.dot` needs 2-D blocks (the tests' negative control)."""
    v = tl.load(x_ptr + tl.arange(0, BLOCK))
    tl.store(x_ptr + tl.arange(0, BLOCK), tl.dot(v, v))


def main(path: str) -> int:
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    specs = json.loads(open(path).read())
    failures = []
    for spec in specs:
        obj = getattr(importlib.import_module(spec["module"]), spec["name"])
        src = ASTSource(JITFunction(getattr(obj, "fn", obj)), spec["signature"], spec["constexprs"])
        try:
            triton_compile(src, target=GPUTarget(*spec["target"]), options=spec["options"])
        except Exception as e:  # noqa: BLE001 - every failure is reported
            what = f"{spec['module']}.{spec['name']} for {spec['target'][1]}"
            failures.append(f"{what}: {type(e).__name__}: {str(e)[:600]}")
    print("\n".join(failures) or f"compiled {len(specs)} kernel launches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
