"""The Triton kernels behind fastload.engine.triton.nf4, imported only when one is launched (this module imports
triton at the top, which `import fastload` must not)."""

from __future__ import annotations

import triton
import triton.language as tl

# tile shapes (rows, columns, warps) for the adapter-merging kernel, timed on first use per weight shape by Triton's
# autotuner: the best one depends on the weight's shape and the GPU (benchmarks/lora_merge_timing.py times each)
LORA_TILES = ((16, 128, 4), (32, 128, 4), (32, 256, 8), (64, 128, 8), (64, 64, 4))


@triton.jit
def unpack_4bit(packed_ptr, byte, in_range, scales_ptr, scales2_ptr, code2_ptr, offset_ptr, code_ptr,
                BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr):
    # the two fp32 values of each packed byte at offsets `byte`, the high nibble first
    packed = tl.load(packed_ptr + byte, mask=in_range, other=0).to(tl.int32)
    block = (byte * 2) // BLOCKSIZE  # both values of a byte share a block: block sizes are even
    if NESTED:
        scale_code = tl.load(scales_ptr + block, mask=in_range, other=0).to(tl.int32)
        scale = (tl.load(code2_ptr + scale_code, mask=in_range, other=0.0)
                 * tl.load(scales2_ptr + block // BLOCKSIZE2, mask=in_range, other=0.0)
                 + tl.load(offset_ptr))
    else:
        scale = tl.load(scales_ptr + block, mask=in_range, other=0.0)
    return tl.load(code_ptr + (packed >> 4)) * scale, tl.load(code_ptr + (packed & 0xF)) * scale


@triton.jit
def dequantize_4bit(packed_ptr, scales_ptr, scales2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr, n_bytes,
                    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BYTES: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BYTES
    offs = start + tl.arange(0, BYTES)
    high, low = unpack_4bit(packed_ptr, offs, offs < n_bytes, scales_ptr, scales2_ptr, code2_ptr, offset_ptr,
                            code_ptr, BLOCKSIZE, BLOCKSIZE2, NESTED)
    values = tl.interleave(high, low).to(out_ptr.dtype.element_ty)
    out_offs = start * 2 + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + out_offs, values, mask=out_offs < n_bytes * 2)


@triton.autotune(configs=[triton.Config({"BM": m, "BN": n}, num_warps=w) for m, n, w in LORA_TILES],
                 key=["rows", "cols", "R", "NESTED", "BLOCKSIZE"])
@triton.jit
def dequantize_4bit_lora(packed_ptr, scales_ptr, scales2_ptr, code2_ptr, offset_ptr, code_ptr, a_ptr, b_ptr,
                         out_ptr, rows, cols, rank, scaling, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                         NESTED: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    # 32-bit offsets: lora_supported admits weights of fewer than 2**31 values
    row = tl.program_id(0) * BM + tl.arange(0, BM)
    byte_col = tl.program_id(1) * (BN // 2) + tl.arange(0, BN // 2)
    high, low = unpack_4bit(packed_ptr, row[:, None] * (cols // 2) + byte_col[None, :],
                            (row < rows)[:, None] & (byte_col < cols // 2)[None, :], scales_ptr, scales2_ptr,
                            code2_ptr, offset_ptr, code_ptr, BLOCKSIZE, BLOCKSIZE2, NESTED)
    weight = tl.interleave(high, low)  # (BM, BN) in fp32
    col = tl.program_id(1) * BN + tl.arange(0, BN)
    k = tl.arange(0, R)
    # fp32 adapters (the trained copies) are rounded here as a cast before the call would round them
    dtype = out_ptr.dtype.element_ty
    b = tl.load(b_ptr + row[:, None] * rank + k[None, :], mask=(row < rows)[:, None] & (k < rank)[None, :],
                other=0.0).to(dtype)
    a = tl.load(a_ptr + k[:, None] * cols + col[None, :], mask=(k < rank)[:, None] & (col < cols)[None, :],
                other=0.0).to(dtype)
    weight += scaling * tl.dot(b, a)  # fp32 accumulation of the rank-r product
    tl.store(out_ptr + row[:, None] * cols + col[None, :], weight.to(out_ptr.dtype.element_ty),
             mask=(row < rows)[:, None] & (col < cols)[None, :])
