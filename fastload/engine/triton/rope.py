"""RoPE on q and k in one Triton launch each way: transformers' rotation (x cos + rotate_half(x) sin) spends about
six elementwise kernels per tensor and pass, forward, recomputation and backward, on tensors as large as the
attention's inputs. Computed in fp32 and rounded once (transformers rounds after each op, so results agree to
bf16 round-off); the outputs are new tensors in the inputs' layout, so nothing the autograd graph saved changes."""

from __future__ import annotations

import torch

from fastload.engine.triton.launch import launch


def _kernels():
    """The kernels module, imported at the first launch: this module stays importable where triton is not."""
    from fastload.engine.triton import rope_kernels

    return rope_kernels


def _block(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())  # the next power of two


def takes(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the kernel computes this call: (batch, heads, seq, head_dim) q and k with unit-stride head_dim,
    one cos/sin row of the full head_dim per position (batch 1 or q's), nothing asking for cos/sin gradients."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return False
    batch, _, seq, dim = q.shape
    return (dim % 2 == 0 and k.shape[0] == batch and k.shape[2:] == (seq, dim)
            and cos.shape[1:] == (seq, dim) and cos.shape[0] in (1, batch)
            and q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1
            and q.dtype == k.dtype and not (cos.requires_grad or sin.requires_grad))


def _launch(q, k, cos, sin, backward: bool):
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)  # the inputs' strides (dense tensors keep them)
    batch, q_heads, seq, dim = q.shape
    cos_batch = 0 if cos.shape[0] == 1 else cos.stride(0)
    sin_batch = 0 if sin.shape[0] == 1 else sin.stride(0)
    block_d = _block(dim // 2)
    warps = 4 if q_heads * dim <= 4096 else 8
    launch(_kernels().rope, (batch * seq,),
        q, k, q_out, k_out, cos, sin, seq, q_heads, k.shape[1], dim // 2,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos_batch, cos.stride(1), sin_batch, sin.stride(1),
        BLOCK_QH=_block(q_heads), BLOCK_KH=_block(k.shape[1]), BLOCK_D=block_d, BACKWARD=backward,
        num_warps=warps)
    return q_out, k_out


class Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors  # (autograd gives zeros for an output that got no gradient)
        d_q, d_k = _launch(grad_q, grad_k, cos, sin, backward=True)
        return d_q, d_k, None, None


def rotate(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb(q, k, cos, sin) for (batch, heads, seq, head_dim) tensors, or None where
    the kernel does not take them (the caller then rotates as transformers does)."""
    if not takes(q, k, cos, sin):
        return None
    return Rotary.apply(q, k, cos, sin)
