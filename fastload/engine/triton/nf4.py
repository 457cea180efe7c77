"""NF4 (and FP4) weights back to 16-bit in one Triton launch, double quantization included.

bitsandbytes' dequantize_4bit makes two kernel launches and about five Python-level tensor calls per weight when
the block scales are themselves quantized (first the scales, then the weight). A LoRA step dequantizes every
weight three times (forward, recomputation, backward), and the GPU waits on that host work (measured:
benchmarks/README.md). Here one kernel reads the packed nibbles, rebuilds each block's scale from its 8-bit code
and the second-level scale, and writes 16-bit values.

`dequantize_4bit_lora` also adds a LoRA adapter's product s * B @ A (rank 16: one tensor-core dot per tile) before
the values are rounded, so a LoRA projection multiplies its input once by W + s B A instead of adding a second
(tokens x out) product to the base matmul's output, an addition that reads and writes every projection's output
three times a step (forward, recomputation, input gradient).

The kernels themselves are in `nf4_kernels` (imported at the first launch: it imports triton); here are the
launches and the checks of what they handle.
"""

from __future__ import annotations

import math
import weakref

import torch

from fastload.engine.triton.launch import launch, tensor_cores_take, triton_available, triton_runs_on

BYTES_PER_PROGRAM = 1024  # packed bytes per Triton program: 2,048 output values
_LORA_TILE_CHOSEN: dict = {}  # weight shape, rank, dtypes, layout, device -> the autotuner's choice, then launched
_LORA_TILES_KEPT: dict = {}  # device -> its AutotuneChoices (the choices of earlier runs, under FASTLOAD_HOME)
_LAYOUT_CHECKED: dict = {}  # id(QuantState) -> (its weak reference, {device type: handled}); asked thrice a step


def dequantize_4bit_lora(packed, state, a, b, scaling: float):
    """W + scaling * b @ a in the weight's 16-bit dtype, rounded once: W from a bitsandbytes 4-bit tensor and its
    QuantState, a (r x in) and b (out x r) contiguous in that same dtype or in fp32 (then rounded to it in the kernel,
    as a cast before the call would: no cast launches)."""
    from fastload.engine.triton.nf4_kernels import dequantize_4bit_lora as kernel

    rows, cols = state.shape
    out = torch.empty(state.shape, dtype=state.dtype, device=packed.device)
    scales, layout = quant_state_args(state)
    rank_padded = max(16, 1 << (a.shape[0] - 1).bit_length())  # the next power of two
    args = (packed, *scales, a, b, out, rows, cols, a.shape[0], float(scaling))
    constants = dict(layout, R=rank_padded)
    key = (rows, cols, rank_padded, state.dtype, a.dtype, layout["NESTED"], state.blocksize, packed.device)
    chosen = _LORA_TILE_CHOSEN.get(key)
    if chosen is None:
        chosen = _LORA_TILE_CHOSEN[key] = kept_tile(key)
    if chosen is None:  # first call for this shape: the autotuner times every tile, then remembers its choice
        kernel[lambda tile: (_cdiv(rows, tile["BM"]), _cdiv(cols, tile["BN"]))](*args, **constants)
        best = getattr(kernel, "best_config", None)
        if best is not None:
            _LORA_TILE_CHOSEN[key] = best.all_kwargs()
            keep_tile(key, _LORA_TILE_CHOSEN[key])
        return out
    # launched with the tile chosen once: the autotuner's own dispatch costs host time on every call
    launch(kernel.fn, (_cdiv(rows, chosen["BM"]), _cdiv(cols, chosen["BN"])), *args, **constants, **chosen)
    return out


def _cdiv(a: int, b: int) -> int:
    """Ceiling division in plain Python: in the Triton torch 2.11 installs, triton.cdiv and next_power_of_2 are
    constexpr functions whose host-side call unwraps every argument (5,040 such calls in five 1B steps, ~9 us each
    under cProfile on an H100 host, 2026-12-08: benchmarks/results/2026-12-08-h100/call3-host-profile-1b.txt)."""
    return -(-a // b)


def _kept_tiles(device):
    from fastload.engine.kernel_cache import AutotuneChoices, cache_dir_for

    if device not in _LORA_TILES_KEPT:
        index = device.index if device.index is not None else torch.cuda.current_device()
        _LORA_TILES_KEPT[device] = AutotuneChoices(cache_dir_for(index), "dequantize_4bit_lora")
    return _LORA_TILES_KEPT[device]


def kept_tile(key: tuple) -> dict | None:
    """An earlier run's autotune choice for this shape on this GPU model, if it is one of today's tiles."""
    from fastload.engine.triton.nf4_kernels import LORA_TILES

    choice = _kept_tiles(key[-1]).get(key[:-1])
    if choice is None or not all(isinstance(v, int) for v in choice.values()):
        return None
    if (choice.get("BM"), choice.get("BN"), choice.get("num_warps")) not in LORA_TILES:
        return None  # a tile an older fastload had: timed again
    return choice


def keep_tile(key: tuple, choice: dict) -> None:
    """Keep the autotuner's choice for later runs (its plain launch settings only)."""
    plain = {k: v for k, v in choice.items() if isinstance(v, int) and not isinstance(v, bool)}
    _kept_tiles(key[-1]).remember(key[:-1], plain)


def lora_supported(packed, state, a, b) -> bool:
    """The adapter-merging kernel's extra conditions: an even row length (whole bytes per row), fewer than 2**31
    values, adapters of the weight's dtype (or fp32) laid out contiguously, of a rank one tensor-core dot covers, a
    GPU whose tensor cores take that dtype."""
    return (supported(packed, state) and state.shape[1] % 2 == 0 and packed.numel() * 2 < 2 ** 31
            and a.dtype == b.dtype and a.dtype in (state.dtype, torch.float32) and a.is_contiguous()
            and b.is_contiguous() and a.shape[0] <= 128
            and a.shape == (b.shape[1], state.shape[1]) and b.shape[0] == state.shape[0]
            and tensor_cores_take(state.dtype, packed.device))


def dequantize_4bit(packed, state, out=None):
    """The 16-bit weight (state.shape, state.dtype) of a bitsandbytes 4-bit tensor and its QuantState."""
    from fastload.engine.triton.nf4_kernels import dequantize_4bit as kernel

    n_bytes = packed.numel()
    if out is None:
        out = torch.empty(state.shape, dtype=state.dtype, device=packed.device)
    scales, layout = quant_state_args(state)
    grid = ((n_bytes + BYTES_PER_PROGRAM - 1) // BYTES_PER_PROGRAM,)
    launch(kernel, grid, packed, *scales, out, n_bytes, **layout, BYTES=BYTES_PER_PROGRAM, num_warps=4)
    return out


def quant_state_args(state) -> tuple[tuple, dict]:
    """What both kernels take after the packed weight: block scales, their own scales, code and offset where the
    scales are quantized (placeholders where not), the 4-bit code; and the layout constants."""
    nested = bool(state.nested)
    second = state.state2 if nested else None
    scales = (state.absmax, second.absmax if nested else state.absmax, second.code if nested else state.code,
              state.offset if nested else state.absmax, state.code)
    return scales, dict(BLOCKSIZE=state.blocksize, BLOCKSIZE2=second.blocksize if nested else 1, NESTED=nested)


def _layout_cache(state) -> dict:
    """Per-QuantState answers, kept beside bitsandbytes' object rather than on it (QuantState is unhashable)."""
    key = id(state)
    entry = _LAYOUT_CHECKED.get(key)
    if entry is None or entry[0]() is not state:
        entry = _LAYOUT_CHECKED[key] = (weakref.ref(state, lambda _, k=key: _LAYOUT_CHECKED.pop(k, None)), {})
    return entry[1]


def supported(packed, state) -> bool:
    """What the kernel handles: a tensor on the current CUDA device packed two values a byte in bitsandbytes' (n/2,
    1) layout, 16-bit output, even block sizes. The layout part is remembered per QuantState and device type."""
    cache = _layout_cache(state)
    known = cache.get(packed.device.type)
    if known is None:
        known = (triton_available(packed.device.type) and packed.dtype.itemsize == 1 and packed.dim() == 2
                 and packed.shape[1] == 1 and state.blocksize % 2 == 0
                 and str(state.dtype) in ("torch.bfloat16", "torch.float16")
                 and packed.numel() * 2 == math.prod(state.shape))
        cache[packed.device.type] = known
    return known and triton_runs_on(packed)
