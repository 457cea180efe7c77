"""Cross-entropy over a chunk of logits in one Triton kernel that overwrites the logits with their gradient.

The plain torch path makes an fp32 copy of the chunk's logits, then passes over it for logsumexp, the shift, the
exponent, the one-hot and the mask, then casts back: about ten passes over (tokens x vocab) values and 8 bytes a
logit. Here each row is read twice (an online max/sum, then softmax - onehot written in place, in the logits'
dtype) with fp32 arithmetic in registers: 2 bytes a logit in bf16, so chunks can be four times longer.
"""

from __future__ import annotations

from fastload.engine.triton.launch import launch


def cross_entropy_in_place(logits, labels, loss_out, ignore_index: int = -100, write_grad: bool = True) -> None:
    """loss_out[i] = CE(logits[i], labels[i]) in fp32 (0 where ignored); with write_grad, logits[i] becomes
    softmax(logits[i]) - onehot(labels[i]) (zero rows where ignored), in the logits' dtype."""
    from fastload.engine.triton.cross_entropy_kernels import cross_entropy_rows

    rows, cols = logits.shape
    if rows == 0:
        return
    block = min(32768, 1 << (cols - 1).bit_length())
    launch(cross_entropy_rows, (rows,), logits, logits.stride(0), labels, loss_out, cols, ignore_index,
           BLOCK=block, WRITE_GRAD=write_grad, num_warps=32 if block >= 8192 else 8)
