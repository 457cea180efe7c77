"""The Triton kernels behind fastload.engine.triton.experts (imported at the first launch: it imports triton).

Rounding follows the torch ops they replace: every intermediate the torch path stores in the activations' dtype is
rounded to it here too, and the arithmetic between is fp32."""

import triton
import triton.language as tl


@triton.jit
def experts_gate_forward(gate_up_ptr, lora_ptr, routing_ptr, out_ptr, n_cols: tl.constexpr,
                         HAS_LORA: tl.constexpr, HAS_ROUTING: tl.constexpr, BLOCK: tl.constexpr):
    """out = silu(gate) * up (* routing weight) per row of [gate | up]; with HAS_LORA the adapter's rows are added
    first and the sums written back over gate_up, which backward then reads."""
    row = tl.program_id(0).to(tl.int64)
    dtype = out_ptr.dtype.element_ty
    gate_row = gate_up_ptr + row * 2 * n_cols
    lora_row = lora_ptr + row * 2 * n_cols
    if HAS_ROUTING:
        weight = tl.load(routing_ptr + row).to(tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        gate = tl.load(gate_row + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_row + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_LORA:
            gate = (gate + tl.load(lora_row + cols, mask=mask, other=0.0).to(tl.float32)).to(dtype)
            up = (up + tl.load(lora_row + n_cols + cols, mask=mask, other=0.0).to(tl.float32)).to(dtype)
            tl.store(gate_row + cols, gate, mask=mask)
            tl.store(gate_row + n_cols + cols, up, mask=mask)
            gate, up = gate.to(tl.float32), up.to(tl.float32)
        silu = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
        h = (silu * up).to(dtype)
        if HAS_ROUTING:
            h = (h.to(tl.float32) * weight).to(dtype)
        tl.store(out_ptr + row * n_cols + cols, h, mask=mask)


@triton.jit
def experts_gate_backward(grad_ptr, gate_up_ptr, d_gate_up_ptr, routing_ptr, d_routing_ptr, n_cols: tl.constexpr,
                          HAS_ROUTING: tl.constexpr, BLOCK: tl.constexpr):
    """Writes gate_up's gradient to d_gate_up (which may be gate_up itself: each element is read before it is
    written); with HAS_ROUTING also each row's routing-weight gradient, sum(grad * silu(gate) * up)."""
    row = tl.program_id(0).to(tl.int64)
    dtype = gate_up_ptr.dtype.element_ty
    gate_row = gate_up_ptr + row * 2 * n_cols
    d_row = d_gate_up_ptr + row * 2 * n_cols
    d_weight = 0.0
    if HAS_ROUTING:
        weight = tl.load(routing_ptr + row).to(tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        grad = tl.load(grad_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(gate_row + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_row + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = (gate * sig).to(dtype).to(tl.float32)
        if HAS_ROUTING:
            d_weight += tl.sum(grad * (silu * up).to(dtype).to(tl.float32), axis=0)
            grad = (grad * weight).to(dtype).to(tl.float32)
        tl.store(d_row + cols, (grad * up * sig * (1.0 + gate * (1.0 - sig))).to(dtype), mask=mask)
        tl.store(d_row + n_cols + cols, (grad * silu).to(dtype), mask=mask)
    if HAS_ROUTING:
        tl.store(d_routing_ptr + row, d_weight.to(d_routing_ptr.dtype.element_ty))


@triton.jit
def combine_rows(rows_ptr, lora_ptr, source_ptr, out_ptr, n_cols: tl.constexpr, K: tl.constexpr,
                 HAS_LORA: tl.constexpr, BLOCK: tl.constexpr):
    """out[t] = sum over j < K of (rows + lora)[source[t * K + j]]: each token's K expert rows summed in fp32."""
    token = tl.program_id(0).to(tl.int64)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in range(K):
            source = tl.load(source_ptr + token * K + j).to(tl.int64)
            value = tl.load(rows_ptr + source * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_LORA:
                lora = tl.load(lora_ptr + source * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
                value = (value + lora).to(rows_ptr.dtype.element_ty).to(tl.float32)
            total += value
        tl.store(out_ptr + token * n_cols + cols, total.to(out_ptr.dtype.element_ty), mask=mask)
