"""fastload.engine.triton.moe's kernels on the CPU, in Triton's interpreter (tests/conftest.py turns it on where
there is no GPU, before triton is imported), so CPU tests reach the fused paths."""

from __future__ import annotations

import collections
import importlib.util
import os

import pytest

needs_interpreter = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton in its interpreter (CPU-only machines; on a GPU the gpu-marked tests run the kernels)")


class _Counting:
    """The kernels module, counting which kernels are launched."""

    def __init__(self, module):
        self.module, self.launched = module, collections.Counter()

    def __getattr__(self, name):
        self.launched[name] += 1
        return getattr(self.module, name)


def count_moe_launches(monkeypatch, on_cpu: bool = False) -> collections.Counter:
    """Count moe's kernel launches; with `on_cpu`, let moe.runs take CPU tensors (the lever's own check asks for
    the current CUDA device). Returns the launch counts."""
    from fastload.engine.triton import moe

    counting = _Counting(moe._kernels())
    monkeypatch.setattr(moe, "_kernels", lambda: counting)
    if on_cpu:
        monkeypatch.setattr(moe, "triton_runs_on", lambda tensor: tensor.device.type == "cpu")
    return counting.launched
