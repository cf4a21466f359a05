"""Run Triton kernels on CPU under the interpreter from inside one pytest process.

Triton decides at import whether its language library runs in the interpreter, so
`TRITON_INTERPRET=1` must be set when triton is first imported. `prepare()` imports it
that way if nobody has yet (and restores the variable, so other tests keep the torch
fallbacks); if triton was already imported for the GPU, `run_in_child` re-runs the test
file in a fresh process with the variable set. Import this module before any xmoe.kernels
import (isort puts it there: it sorts before `xmoe`).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def prepare() -> bool:
    """True when this process can interpret Triton kernels on CPU."""
    if "triton" not in sys.modules:
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            import triton.language  # noqa: F401
        finally:
            if old is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = old
    import triton.language.standard as std
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(std.sum, InterpretedFunction)


READY = prepare()


CHILD_ENV = "XMOE_TRITON_INTERP_CHILD"


def run_in_child(test_file: str) -> None:
    # The child's prepare() imports triton for the interpreter and leaves TRITON_INTERPRET
    # unset, as in a process that runs the file alone: tests of the torch paths (fp64) stay
    # on torch, and the kernel tests set the variable themselves.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[CHILD_ENV] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", test_file],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def child_process_test(test_file: str):
    """The test that re-runs `test_file` under the interpreter when this process cannot.

    A kernel test module binds it as `test_in_interpreter_process = child_process_test(__file__)`.
    """

    @pytest.mark.skipif(READY, reason="the kernels run in this process")
    def test_in_interpreter_process() -> None:
        if os.environ.get(CHILD_ENV):
            pytest.fail("triton was imported before triton_interp could set up the interpreter")
        run_in_child(test_file)

    return test_in_interpreter_process
