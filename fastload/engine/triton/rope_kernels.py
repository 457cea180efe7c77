"""The Triton kernel behind fastload.engine.triton.rope (imported at the first launch: it imports triton)."""

import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, out_ptr, x_head_stride, out_head_stride, heads, half, c1, c2, s1, s2,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
    """One token's heads: forward (x1 c1 - x2 s1, x2 c2 + x1 s2), backward its transpose (g1 c1 + g2 s2,
    g2 c2 - g1 s1), over the two halves of each head, in fp32, rounded once."""
    h = tl.arange(0, BLOCK_H)[:, None].to(tl.int64)  # heads x a head's stride passes 2**31 from ~512k tokens
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < heads) & (d < half)
    first = x_ptr + h * x_head_stride + d
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    out = out_ptr + h * out_head_stride + d
    tl.store(out, y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + half, y2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rope(q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, seq_len, q_heads, k_heads, half,
         q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, qo_sb, qo_sh, qo_ss, ko_sb, ko_sh, ko_ss, c_sb, c_ss, s_sb, s_ss,
         BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
    """One program per token (batch row b, position s): all of its query and key heads, one cos/sin row read."""
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    s = token % seq_len
    d = tl.arange(0, BLOCK_D)[None, :]
    dmask = d < half
    cos_row = cos_ptr + b * c_sb + s * c_ss
    sin_row = sin_ptr + b * s_sb + s * s_ss
    c1 = tl.load(cos_row + d, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + half + d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_row + d, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_row + half + d, mask=dmask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + b * q_sb + s * q_ss, q_out_ptr + b * qo_sb + s * qo_ss, q_sh, qo_sh, q_heads, half,
                  c1, c2, s1, s2, BLOCK_QH, BLOCK_D, BACKWARD)
    _rotate_heads(k_ptr + b * k_sb + s * k_ss, k_out_ptr + b * ko_sb + s * ko_ss, k_sh, ko_sh, k_heads, half,
                  c1, c2, s1, s2, BLOCK_KH, BLOCK_D, BACKWARD)
