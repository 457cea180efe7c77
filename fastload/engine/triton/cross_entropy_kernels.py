"""The Triton kernel behind fastload.engine.triton.cross_entropy (imported at the first launch: it imports triton)."""

import triton
import triton.language as tl


@triton.jit
def cross_entropy_rows(logits_ptr, row_stride, labels_ptr, loss_ptr, n_cols, ignore_index,
                       BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    running_max = -float("inf")
    running_sum = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    safe_label = tl.where(valid, label, 0)
    target = tl.load(base + safe_label).to(tl.float32)  # read before the row is overwritten below
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
    if WRITE_GRAD:
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            in_row = cols < n_cols
            x = tl.load(base + cols, mask=in_row, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(cols == safe_label, 1.0, 0.0)
            grad = tl.where(valid, grad, 0.0)
            tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_row)
