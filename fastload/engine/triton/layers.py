"""RMSNorm (frozen weight) and SwiGLU as lean Triton kernels: one launch each way, little host work per call.

liger-kernel has both, but its Python wrappers cost several times the GPU's work in host time per call, and a
checkpointed QLoRA step calls them five times per layer: the GPU then waits on the host. QLoRA freezes the norm
weights, so the norm's backward here computes the input gradient only (a trained norm weight keeps transformers' or
liger's path). Results round like transformers' modules: the normalised activations are cast to the input dtype
before the weight multiplies them; silu(gate) is rounded before the product with up."""

from __future__ import annotations

import torch

from fastload.engine.triton.launch import launch
from fastload.train.single_use import graph_is_single_use

ELEMENTWISE_BLOCK = 2048


def _kernels():
    """The kernels module, imported at the first launch: this module stays importable where triton is not."""
    from fastload.engine.triton import layers_kernels

    return layers_kernels


def _norm_launch(n_cols: int) -> tuple[int, int]:
    block = 1 << (n_cols - 1).bit_length()  # the next power of two
    return block, min(16, max(4, block // 512))


def _elementwise_grid(n: int) -> tuple[int]:
    return (-(-n // ELEMENTWISE_BLOCK),)


class FrozenRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        # transformers: weight * normed.to(input dtype), so an fp32 weight gives an fp32 output
        y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        block, warps = _norm_launch(x2.shape[1])
        launch(_kernels().rmsnorm_forward, (x2.shape[0],), x2, weight, y, rstd, x2.shape[1], eps, BLOCK=block,
               num_warps=warps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(-1, x2.shape[1]).contiguous()
        dx = torch.empty_like(x2)
        block, warps = _norm_launch(x2.shape[1])
        launch(_kernels().rmsnorm_backward, (x2.shape[0],), dy2, x2, weight, rstd, dx, x2.shape[1],
                                                    BLOCK=block, num_warps=warps)
        return dx.view(dy.shape), None, None


class SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        launch(_kernels().swiglu_forward, _elementwise_grid(n), gate, up, out, n, BLOCK=ELEMENTWISE_BLOCK,
                                                              num_warps=8)
        ctx.save_for_backward(gate, up)
        ctx.overwrite = graph_is_single_use()
        return out

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad = grad.contiguous()
        n = gate.numel()
        # over the saved inputs when this graph runs backward once (the engine's recomputation): no second pair of
        # activation-sized buffers; fresh ones otherwise, so a retained graph's second backward reads intact inputs
        d_gate, d_up = (gate, up) if ctx.overwrite else (torch.empty_like(gate), torch.empty_like(up))
        launch(_kernels().swiglu_backward, _elementwise_grid(n), grad, gate, up, d_gate, d_up, n,
               BLOCK=ELEMENTWISE_BLOCK, num_warps=8)
        return d_gate, d_up


def rms_norm(x, weight, eps: float):
    """transformers' Llama RMSNorm for a weight that is not trained."""
    return FrozenRMSNorm.apply(x, weight, eps)


def swiglu(gate, up):
    """silu(gate) * up; inside the engine's recomputation its backward reuses the buffers of gate and up for their
    gradients."""
    return SwiGLU.apply(gate, up)
