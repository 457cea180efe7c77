"""The Triton kernels behind fastload.engine.triton.moe (imported at the first launch: it imports triton).

Values round where transformers' separate operations round (each product and sum of two 16-bit tensors is a
16-bit tensor there), so a kernel gives transformers' values up to the order of fp32 sums."""

import triton
import triton.language as tl


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    return x.to(dtype).to(tl.float32)


@triton.jit
def _gate_up(gu_ptr, delta_ptr, offs_gate, mask, inter, dtype: tl.constexpr, HAS_DELTA: tl.constexpr):
    # gate and up of a [gate | up] row (rounded after adding the LoRA product where there is one)
    gate = tl.load(gu_ptr + offs_gate, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + offs_gate + inter, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        gate = _rounded(gate + tl.load(delta_ptr + offs_gate, mask=mask, other=0.0).to(tl.float32), dtype)
        up = _rounded(up + tl.load(delta_ptr + offs_gate + inter, mask=mask, other=0.0).to(tl.float32), dtype)
    return gate, up


@triton.jit
def gated_forward(gu_ptr, delta_ptr, r_ptr, h_ptr, rows, inter, HAS_DELTA: tl.constexpr, HAS_ROUTING: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr):
    """h = silu(gate) * up (* r per row) for rows of [gate | up] (+ delta): (rows, 2 inter) -> (rows, inter)."""
    dtype = h_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    col = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (row < rows)[:, None] & (col < inter)[None, :]
    gate, up = _gate_up(gu_ptr, delta_ptr, row[:, None] * (2 * inter) + col[None, :], mask, inter, dtype, HAS_DELTA)
    silu = _rounded(gate * tl.sigmoid(gate), dtype)
    h = silu * up
    if HAS_ROUTING:
        r = tl.load(r_ptr + row, mask=row < rows, other=0.0).to(tl.float32)
        h = _rounded(h, dtype) * r[:, None]
    tl.store(h_ptr + row[:, None] * inter + col[None, :], h.to(dtype), mask=mask)


@triton.jit
def gated_backward(dh_ptr, dh2_ptr, gu_ptr, delta_ptr, r_ptr, dgu_ptr, dr_ptr, rows, inter, HAS_DH2: tl.constexpr,
                   HAS_DELTA: tl.constexpr, HAS_ROUTING: tl.constexpr, NEEDS_DR: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr):
    """d[gate | up] from dh (+ dh2, rounded), recomputing silu(gate) and the product from the saved [gate | up]
    (+ delta); with routing weights also d r = sum over the row of dh * silu(gate) * up. One program per BM rows,
    across all columns."""
    dtype = dgu_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    in_rows = row < rows
    if HAS_ROUTING:
        r = tl.load(r_ptr + row, mask=in_rows, other=0.0).to(tl.float32)
    dr = tl.zeros((BM,), dtype=tl.float32)
    for start in range(0, inter, BN):
        col = start + tl.arange(0, BN)
        mask = in_rows[:, None] & (col < inter)[None, :]
        offs = row[:, None] * (2 * inter) + col[None, :]
        gate, up = _gate_up(gu_ptr, delta_ptr, offs, mask, inter, dtype, HAS_DELTA)
        dh = tl.load(dh_ptr + row[:, None] * inter + col[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_DH2:
            dh = _rounded(dh + tl.load(dh2_ptr + row[:, None] * inter + col[None, :], mask=mask, other=0.0)
                          .to(tl.float32), dtype)
        sig = tl.sigmoid(gate)
        silu = _rounded(gate * sig, dtype)
        if HAS_ROUTING:
            if NEEDS_DR:
                dr += tl.sum(_rounded(dh * _rounded(silu * up, dtype), dtype), axis=1)
            dh = _rounded(dh * r[:, None], dtype)
        d_silu = _rounded(dh * up, dtype)
        tl.store(dgu_ptr + offs, (d_silu * sig * (1.0 + gate * (1.0 - sig))).to(dtype), mask=mask)
        tl.store(dgu_ptr + offs + inter, (dh * silu).to(dtype), mask=mask)
    if NEEDS_DR:
        tl.store(dr_ptr + row, dr.to(dr_ptr.dtype.element_ty), mask=in_rows)


@triton.jit
def gather_sum(y_ptr, delta_ptr, index_ptr, out_ptr, width, K, HAS_DELTA: tl.constexpr, BN: tl.constexpr):
    """out[t] = sum over j < K of (y + delta)[index[t K + j]], summed in fp32 and rounded once."""
    dtype = out_ptr.dtype.element_ty
    token = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = col < width
    acc = tl.zeros((BN,), dtype=tl.float32)
    for j in range(0, K):
        row = tl.load(index_ptr + token * K + j).to(tl.int64)
        value = tl.load(y_ptr + row * width + col, mask=mask, other=0.0).to(tl.float32)
        if HAS_DELTA:
            value = _rounded(value + tl.load(delta_ptr + row * width + col, mask=mask, other=0.0).to(tl.float32),
                             dtype)
        acc += value
    tl.store(out_ptr + token * width + col, acc.to(dtype), mask=mask)
