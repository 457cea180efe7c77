"""Which device a load goes to, which dtype computes there, and how much memory it has free."""

from __future__ import annotations

import functools
import os
import re
from typing import Any

import torch

from fastload._log import logger
from fastload.errors import DeviceUnavailable, InvalidOption
from fastload.settings import env_switch


def cuda_available() -> bool:
    return torch.cuda.is_available()


DEVICE_NAME = re.compile(r"^(cpu|cuda(:\d+)?|mps|xpu(:\d+)?|npu(:\d+)?)$")


def resolve_device_map(device_map: Any) -> Any:
    """Default: the single (current) GPU if there is one, else the CPU. Explicit GPU requests need a GPU."""
    if device_map is None or device_map == "auto":
        return {"": 0} if cuda_available() else {"": "cpu"}
    if isinstance(device_map, str) and device_map in ("cpu",):
        return {"": "cpu"}
    if not isinstance(device_map, (str, int, dict)) or isinstance(device_map, bool) or (
            isinstance(device_map, str) and not DEVICE_NAME.match(device_map)):
        raise InvalidOption(f"device_map={device_map!r}", found="not a device fastload or accelerate knows",
                            fix="leave it unset (the GPU if there is one, else the CPU), or pass 'cpu', 'cuda', "
                                "'cuda:1', 'auto' or a dict of module names to devices")
    wants_gpu = (isinstance(device_map, str) and device_map.startswith("cuda")) or isinstance(device_map, int) or (
        isinstance(device_map, dict)
        and any(isinstance(v, int) or str(v).startswith("cuda") for v in device_map.values()))
    if wants_gpu and not cuda_available():
        raise DeviceUnavailable(f"device_map={device_map!r} asks for a CUDA GPU",
                                found="torch sees no CUDA GPU on this machine (torch.cuda.is_available() is False)",
                                fix="leave device_map unset to load on the CPU, or run on a machine with a GPU")
    if isinstance(device_map, (str, int)):
        return {"": device_map}
    return device_map


def main_device(device_map: dict) -> str:
    """'cuda' if any part of the model goes to a GPU, else 'cpu'."""
    for v in device_map.values():
        if isinstance(v, int) or str(v).startswith("cuda"):
            return "cuda"
    return "cpu"


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them bf16 matmuls on the CPU are emulated (measured ~35x slower than fp32)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


CPU_BF16_SWITCH = "FASTLOAD_CPU_BF16"  # 1: bf16 on any CPU, 0: fp32 on every CPU, unset: bf16 where it is native


def choose_compute_dtype(device: str):
    """bf16 on GPUs with capability >= 8.0, fp16 on older GPUs; on the CPU fp32 unless it has native bf16, or as
    FASTLOAD_CPU_BF16 says (one machine type, one dtype: runs compared across machines stay comparable)."""
    if device == "cuda":
        major, _ = torch.cuda.get_device_capability()
        return torch.bfloat16 if major >= 8 else torch.float16
    bf16 = env_switch(CPU_BF16_SWITCH)
    return torch.bfloat16 if (cpu_has_native_bf16() if bf16 is None else bf16) else torch.float32


def check_dtype_supported(dtype, device: str) -> None:
    if device == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] < 8:
        name = torch.cuda.get_device_name()
        raise InvalidOption("compute dtype bfloat16 was asked for",
                            found=f"{name} has no bf16 arithmetic (capability < 8.0)",
                            fix="use dtype=torch.float16, or leave dtype unset to choose automatically")


ALLOCATOR_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


@functools.lru_cache(maxsize=1)
def use_expandable_segments() -> bool:
    """Let the CUDA caching allocator grow segments in place, unless the user configured the allocator.

    Without it, offload buffers, chunked losses and activations of changing sizes fragment the pool: what the
    allocator reserves (what nvidia-smi and an out-of-memory error see) ran 1.6x above what it allocated at 32k tokens.

    Returns:
        True when expandable segments were turned on here; False when the user's setting stands or torch refused.
    """
    chosen = next((name for name in ALLOCATOR_ENV if os.environ.get(name)), None)
    if chosen:
        logger.debug("CUDA allocator: %s=%s kept as set", chosen, os.environ[chosen])
        return False
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch >= 2.9; the cuda one is deprecated
    try:
        (setter or torch.cuda.memory._set_allocator_settings)("expandable_segments:True")
    except (AttributeError, RuntimeError) as e:  # an older torch, or an allocator that does not support it
        logger.debug("CUDA allocator: expandable segments unavailable (%s)", e)
        return False
    logger.info("CUDA allocator: expandable segments on (set PYTORCH_CUDA_ALLOC_CONF to choose otherwise)")
    return True


LEFTOVER_BYTES_WORTH_RELEASING = 256 * 2**20


def release_cached_memory() -> None:
    """Hand what the CUDA caching allocator holds unused back to the driver before a load: the load's weights would
    otherwise be placed inside those cached segments (an earlier model's, a freed buffer's), and a segment with one
    live tensor in it can never be released. On an H100 768 MiB cached before a load stayed reserved after it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def release_load_leftovers(model) -> int:
    """Hand the memory the load freed but the CUDA caching allocator still holds back to the driver.

    Staging buffers and 16-bit copies freed during a load stay reserved otherwise: 3.98 GiB cached beside 3.96
    allocated after a Qwen3-MoE store load on an H100 (2026-12-06), which the first steps then never needed and which
    nvidia-smi, other processes and the run's reserved peak all count (7.96 GiB against Unsloth's 6.57).

    Returns:
        The bytes released on the model's GPUs (0 where it is not on one, or little was cached).
    """
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})

    def cached() -> int:
        return sum(torch.cuda.memory_reserved(d) - torch.cuda.memory_allocated(d) for d in devices)

    before = cached()
    if before < LEFTOVER_BYTES_WORTH_RELEASING:
        return 0
    torch.cuda.empty_cache()
    released = before - cached()
    logger.debug("released %.2f GiB the load had left cached on %s", released / 2**30,
                 ", ".join(f"cuda:{d}" for d in devices))
    return released


def free_memory_bytes(device: str) -> int:
    """Free bytes on the device: the GPU's free memory, or the CPU's MemAvailable."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    override = os.environ.get("FASTLOAD_MEMORY_LIMIT_BYTES")  # for containers whose cgroup limit /proc does not show
    if override:
        try:
            return int(override)
        except ValueError:
            raise InvalidOption(f"FASTLOAD_MEMORY_LIMIT_BYTES={override!r}", found="it is not a whole number of bytes",
                                fix="set it to e.g. 8000000000, or unset it to use what the machine reports") from None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse
