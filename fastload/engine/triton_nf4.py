"""NF4 (and FP4) weights back to 16-bit in one Triton launch, double quantization included.

bitsandbytes' dequantize_4bit makes two kernel launches and about five Python-level tensor calls per weight when
the block scales are themselves quantized (first the scales, then the weight). A LoRA step dequantizes every
weight three times (forward, recomputation, backward): on an 8B model at 2 x 2048 tokens the profile showed
~45 us of host time per call, ~30 ms a step, with the GPU waiting on it. Here one kernel reads the packed
nibbles, rebuilds each block's scale from its 8-bit code and the second-level scale, and writes 16-bit values.
"""

from __future__ import annotations

import functools
import math

BYTES_PER_PROGRAM = 1024  # packed bytes per Triton program: 2,048 output values


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def dequantize_4bit(packed_ptr, scales_ptr, scales2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr, n_bytes,
                        BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                        BYTES: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * BYTES
        offs = start + tl.arange(0, BYTES)
        in_range = offs < n_bytes
        packed = tl.load(packed_ptr + offs, mask=in_range, other=0).to(tl.int32)
        block = (offs * 2) // BLOCKSIZE  # both values of a byte share a block: block sizes are even
        if NESTED:
            scale_code = tl.load(scales_ptr + block, mask=in_range, other=0).to(tl.int32)
            scale = (tl.load(code2_ptr + scale_code, mask=in_range, other=0.0)
                     * tl.load(scales2_ptr + block // BLOCKSIZE2, mask=in_range, other=0.0)
                     + tl.load(offset_ptr))
        else:
            scale = tl.load(scales_ptr + block, mask=in_range, other=0.0)
        high = tl.load(code_ptr + (packed >> 4)) * scale      # the first value of a byte is its high nibble
        low = tl.load(code_ptr + (packed & 0xF)) * scale
        values = tl.interleave(high, low).to(out_ptr.dtype.element_ty)
        out_offs = start * 2 + tl.arange(0, 2 * BYTES)
        tl.store(out_ptr + out_offs, values, mask=out_offs < n_bytes * 2)

    return dequantize_4bit


def dequantize_4bit(packed, state, out=None):
    """The 16-bit weight (state.shape, state.dtype) of a bitsandbytes 4-bit tensor and its QuantState."""
    import torch

    n_bytes = packed.numel()
    if out is None:
        out = torch.empty(state.shape, dtype=state.dtype, device=packed.device)
    nested = bool(state.nested)
    second = state.state2 if nested else None
    grid = ((n_bytes + BYTES_PER_PROGRAM - 1) // BYTES_PER_PROGRAM,)
    _kernel()[grid](packed, state.absmax, second.absmax if nested else state.absmax,
                    second.code if nested else state.code, state.offset if nested else state.absmax,
                    state.code, out, n_bytes, BLOCKSIZE=state.blocksize,
                    BLOCKSIZE2=second.blocksize if nested else 1, NESTED=nested, BYTES=BYTES_PER_PROGRAM,
                    num_warps=4)
    return out


def supported(packed, state) -> bool:
    """What the kernel handles: a CUDA tensor packed two values a byte in bitsandbytes' (n/2, 1) layout, 16-bit
    output, even block sizes. Remembered on the QuantState per device type: asked three times a step per weight."""
    cache = getattr(state, "_fastload_triton", None)
    if cache is None:
        cache = state._fastload_triton = {}
    known = cache.get(packed.device.type)
    if known is None:
        from . import triton_available

        known = (triton_available(packed.device.type) and packed.dtype.itemsize == 1 and packed.dim() == 2
                 and packed.shape[1] == 1 and state.blocksize % 2 == 0
                 and str(state.dtype) in ("torch.bfloat16", "torch.float16")
                 and packed.numel() * 2 == math.prod(state.shape))
        cache[packed.device.type] = known
    return known

