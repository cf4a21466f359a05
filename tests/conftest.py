"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest


@pytest.fixture
def interpreter(monkeypatch):
    """Kernels run in Triton's CPU interpreter in this test (else it is skipped)."""
    # imported here, not at the top: the kernel test module has already imported it first
    import torch
    import triton_interp

    from xmoe.kernels import backend

    if not triton_interp.READY:
        pytest.skip(
            "triton was imported without the interpreter: test_in_interpreter_process runs these"
        )
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.use_triton(torch.zeros(1))
