"""One autograd function per LoRA projection: y = x W^T + s (x A^T) B^T, all in the compute dtype.

peft computes the adapter branch in the adapters' dtype (fp32 here, kept so on purpose for the optimizer): every
projection casts its input to fp32, multiplies in fp32 and adds an fp32 (tokens x out) result back, and autograd
keeps those copies for backward. Here the fp32 adapters are cast to the compute dtype once per call (r x in values,
not tokens x in), the adapter product is accumulated into the base matmul's output in place, and backward
re-dequantizes the 4-bit weight instead of keeping it. Gradients of A and B come back in fp32.
"""

from __future__ import annotations

import types

_FUNCTION = None


def _lora_function():
    global _FUNCTION
    if _FUNCTION is not None:
        return _FUNCTION
    import torch

    def full_weight(base, dtype):
        weight = base.weight
        state = getattr(weight, "quant_state", None)
        if state is None:  # a 16-bit base layer
            return weight.to(dtype)
        import bitsandbytes.functional as F

        return F.dequantize_4bit(weight.data, state).to(dtype)

    class LoraProjection(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, lora_a, lora_b, base, scaling):
            # what bitsandbytes computes in (its compute_dtype), else the input's; the output keeps the input's
            dtype = getattr(base, "compute_dtype", None) or x.dtype
            ctx.in_dtype = x.dtype
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            xa = x2 @ a.t()
            y = x2 @ full_weight(base, dtype).t()
            y.addmm_(xa, b.t(), alpha=scaling)
            if base.bias is not None:
                y += base.bias.to(dtype)
            ctx.save_for_backward(x2, xa, lora_a, lora_b)
            ctx.base, ctx.scaling, ctx.x_shape = base, scaling, x.shape
            return y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)

        @staticmethod
        def backward(ctx, grad_y):
            x2, xa, lora_a, lora_b = ctx.saved_tensors
            dtype, s = x2.dtype, ctx.scaling
            dy = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            dyb = (dy @ b).mul_(s)                                  # (tokens, r)
            grad_b = (dy.t() @ xa).float().mul_(s) if ctx.needs_input_grad[2] else None
            grad_a = (dyb.t() @ x2).float() if ctx.needs_input_grad[1] else None
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = dy @ full_weight(ctx.base, dtype)
                grad_x.addmm_(dyb, a)
                grad_x = grad_x.view(ctx.x_shape).to(ctx.in_dtype)
            return grad_x, grad_a, grad_b, None, None

    _FUNCTION = LoraProjection
    return _FUNCTION


def _fusable(module) -> bool:
    """A peft LoRA projection on a bitsandbytes 4-bit or plain linear layer, without DoRA, dropout or bias tricks."""
    import torch

    base = getattr(module, "base_layer", None)
    if base is None or not hasattr(module, "lora_A") or type(base).__name__ not in ("Linear4bit", "Linear"):
        return False
    if type(base).__name__ == "Linear" and not isinstance(base, torch.nn.Linear):
        return False
    if any(getattr(module, "use_dora", {}).values()):
        return False
    return all(isinstance(d, torch.nn.Identity) for d in module.lora_dropout.values())


def install_fused_lora(model) -> int:
    """Give each fusable LoRA projection of this instance the fused forward; returns how many."""
    count = 0
    for module in model.modules():
        if _fusable(module):
            original = module.forward

            def forward(self, x, *args, _original=original, **kwargs):
                active = self.active_adapters
                if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1
                        or active[0] not in self.lora_A or not x.is_floating_point()):
                    return _original(x, *args, **kwargs)
                name = active[0]
                return _lora_function().apply(x, self.lora_A[name].weight, self.lora_B[name].weight, self.base_layer,
                                              self.scaling[name])

            module.forward = types.MethodType(forward, module)
            count += 1
    return count
