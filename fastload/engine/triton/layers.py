"""RMSNorm (frozen weight) and SwiGLU as lean Triton kernels: one launch each way, little host work per call.

liger-kernel has both, but its Python wrappers spent ~150-200 us of host time per call on the 8B profile (the
GPU part is ~20 us), and a checkpointed QLoRA step calls them five times per layer: the GPU then waits on the
host. QLoRA freezes the norm weights, so the norm's backward here computes the input gradient only (a trained
norm weight keeps transformers' or liger's path). Results round like transformers' modules: the normalised
activations are cast to the input dtype before the weight multiplies them; silu(gate) is rounded before the
product with up.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def rmsnorm_forward(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * n_cols + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def rmsnorm_backward(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        dy = tl.load(dy_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        g = dy * w
        normed = x * rstd
        dx = rstd * (g - normed * (tl.sum(g * normed, axis=0) / n_cols))
        tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def swiglu_forward(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        gate = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        silu = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + offs, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def swiglu_backward(grad_ptr, gate_ptr, up_ptr, n, BLOCK: tl.constexpr):
        """Overwrites gate with d(gate) and up with d(up): forward's saved inputs, not needed after this."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        d_gate = grad * up * sig * (1.0 + gate * (1.0 - sig))
        tl.store(gate_ptr + offs, d_gate.to(gate_ptr.dtype.element_ty), mask=mask)
        tl.store(up_ptr + offs, (grad * silu).to(up_ptr.dtype.element_ty), mask=mask)

    return rmsnorm_forward, rmsnorm_backward, swiglu_forward, swiglu_backward


ELEMENTWISE_BLOCK = 2048


def _norm_launch(n_cols: int) -> tuple[int, int]:
    import triton

    block = triton.next_power_of_2(n_cols)
    return block, min(16, max(4, block // 512))


@functools.lru_cache(maxsize=None)
def _functions():
    import torch
    import triton

    rmsnorm_forward, rmsnorm_backward, swiglu_forward, swiglu_backward = _kernels()

    class FrozenRMSNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, eps):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1]).contiguous()
            # transformers: weight * normed.to(input dtype), so an fp32 weight gives an fp32 output
            y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
            rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
            block, warps = _norm_launch(x2.shape[1])
            rmsnorm_forward[(x2.shape[0],)](x2, weight, y, rstd, x2.shape[1], eps, BLOCK=block, num_warps=warps)
            ctx.save_for_backward(x2, weight, rstd)
            return y.view(shape)

        @staticmethod
        def backward(ctx, dy):
            x2, weight, rstd = ctx.saved_tensors
            dy2 = dy.reshape(-1, x2.shape[1]).contiguous()
            dx = torch.empty_like(x2)
            block, warps = _norm_launch(x2.shape[1])
            rmsnorm_backward[(x2.shape[0],)](dy2, x2, weight, rstd, dx, x2.shape[1], BLOCK=block, num_warps=warps)
            return dx.view(dy.shape), None, None

    class SwiGLU(torch.autograd.Function):
        @staticmethod
        def forward(ctx, gate, up):
            gate, up = gate.contiguous(), up.contiguous()
            out = torch.empty_like(gate)
            n = gate.numel()
            swiglu_forward[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](gate, up, out, n, BLOCK=ELEMENTWISE_BLOCK,
                                                                  num_warps=8)
            ctx.save_for_backward(gate, up)
            return out

        @staticmethod
        def backward(ctx, grad):
            gate, up = ctx.saved_tensors
            grad = grad.contiguous()
            n = gate.numel()
            swiglu_backward[(triton.cdiv(n, ELEMENTWISE_BLOCK),)](grad, gate, up, n, BLOCK=ELEMENTWISE_BLOCK,
                                                                   num_warps=8)
            return gate, up

    return FrozenRMSNorm, SwiGLU


def rms_norm(x, weight, eps: float):
    """transformers' Llama RMSNorm for a weight that is not trained."""
    return _functions()[0].apply(x, weight, eps)


def swiglu(gate, up):
    """silu(gate) * up; backward reuses the buffers of gate and up for their gradients."""
    return _functions()[1].apply(gate, up)
