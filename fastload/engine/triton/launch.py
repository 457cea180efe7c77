"""Whether a Triton kernel may launch here: the one place every lever asks before taking its kernel path."""

from __future__ import annotations

import functools
import importlib.util

import torch

from fastload.engine.kernel_cache import cache_dir_for, point_triton_cache


@functools.lru_cache(maxsize=None)
def triton_available(device_type: str) -> bool:
    """fastload's Triton kernels run on NVIDIA CUDA devices where triton is installed (it comes with CUDA builds of
    torch). ROCm builds also say "cuda"; the kernels' launch settings (up to 32 warps) are NVIDIA's."""
    if device_type != "cuda":
        return False
    available = importlib.util.find_spec("triton") is not None and torch.version.hip is None
    if available:  # before any kernel module imports triton: compiled kernels then persist across runs
        point_triton_cache(cache_dir_for(torch.cuda.current_device()))
    return available


def triton_runs_on(tensor) -> bool:
    """Whether a Triton kernel can be launched on this tensor now: Triton launches on the current CUDA device, so
    a layer placed on another GPU (device_map over several) takes the torch path."""
    if not triton_available(tensor.device.type):
        return False
    return tensor.device.index is None or tensor.device.index == torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _capability(device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def tensor_cores_take(dtype, device) -> bool:
    """tl.dot on bf16 needs Ampere (compute capability 8.0) or newer, on fp16 Volta (7.0); asked once per device."""
    return _capability(device) >= ((8, 0) if dtype == torch.bfloat16 else (7, 0))
