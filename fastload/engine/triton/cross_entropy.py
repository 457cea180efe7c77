"""Cross-entropy over a chunk of logits in one Triton kernel that overwrites the logits with their gradient.

The plain torch path makes an fp32 copy of the chunk's logits, then passes over it for logsumexp, the shift, the
exponent, the one-hot and the mask, then casts back: about ten passes over (tokens x vocab) values and 8 bytes a
logit. Here each row is read twice (an online max/sum, then softmax - onehot written in place, in the logits'
dtype) with fp32 arithmetic in registers: 2 bytes a logit in bf16, so chunks can be four times longer.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def _kernel():
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

    return cross_entropy_rows


def cross_entropy_in_place(logits, labels, loss_out, ignore_index: int = -100, write_grad: bool = True) -> None:
    """loss_out[i] = CE(logits[i], labels[i]) in fp32 (0 where ignored); with write_grad, logits[i] becomes
    softmax(logits[i]) - onehot(labels[i]) (zero rows where ignored), in the logits' dtype."""
    import triton

    rows, cols = logits.shape
    if rows == 0:
        return
    block = min(32768, triton.next_power_of_2(cols))
    _kernel()[(rows,)](logits, logits.stride(0), labels, loss_out, cols, ignore_index,
                       BLOCK=block, WRITE_GRAD=write_grad, num_warps=32 if block >= 8192 else 8)
