"""The elementwise work around a mixture-of-experts layer's grouped matmuls, fused into three Triton kernels.

transformers' grouped_mm experts forward (and fastload.engine.expert_lora, which follows it) runs, per layer, the
LoRA product's addition, silu(gate), its product with up and with each row's routing weight, the rows' return to
token order and the sum over each token's k experts as separate operations, each reading and writing tensors of
(tokens x k) rows; backward adds their gradients (two products, silu's backward, a concatenation of the two halves,
the routing weight's product and sum, a gather). Here:

- `gated_activation`: silu(gate) * up * routing weight from the gate_up projection's output plus its LoRA product,
  read once; backward writes d[gate | up] in one buffer (no concatenation) and the routing weights' gradient.
- `combine`: the down projection's output plus its LoRA product, each token's k rows gathered and summed (fp32) in
  one pass; backward is one gather.
- `gather_sum`: the same gather and sum without autograd, for the gradient of spreading tokens to their experts.

The kernels are in `moe_kernels` (imported at the first launch: it imports triton); whether they may launch is the
caller's question (`runs`), which keeps transformers' arithmetic where they may not.
"""

from __future__ import annotations

import torch

from fastload.engine.triton.launch import triton_runs_on

GATE_ROWS, GATE_COLS = 16, 256  # rows x columns per program of the gate kernels (one row's columns in a loop)
SUM_COLS = 1024  # columns per program of the gather-sum


def _kernels():
    from fastload.engine.triton import moe_kernels

    return moe_kernels


def runs(*tensors) -> bool:
    """Whether the kernels take these tensors (None for an absent operand): contiguous, of one floating dtype, on the
    CUDA device Triton launches on."""
    present = [t for t in tensors if t is not None]
    return (all(triton_runs_on(t) and t.is_contiguous() and t.dtype == present[0].dtype for t in present)
            and present[0].dtype in (torch.bfloat16, torch.float16, torch.float32))


class GatedActivation(torch.autograd.Function):
    """silu(gate) * up (* routing) for [gate | up] = gate_up + delta, each (rows, 2 * inter); routing (rows, 1).
    Returned twice (the second a view of the first) for two consumers, whose gradients backward adds as it reads."""

    @staticmethod
    def forward(ctx, gate_up, delta, routing):
        rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
        h = gate_up.new_empty(rows, inter)
        grid = (triton_cdiv(rows, GATE_ROWS), triton_cdiv(inter, GATE_COLS))
        _kernels().gated_forward[grid](gate_up, delta if delta is not None else gate_up,
                                       routing if routing is not None else gate_up, h, rows, inter,
                                       HAS_DELTA=delta is not None, HAS_ROUTING=routing is not None,
                                       BM=GATE_ROWS, BN=GATE_COLS, num_warps=4)
        ctx.save_for_backward(gate_up, delta, routing)
        ctx.has_delta, ctx.has_routing = delta is not None, routing is not None
        return h, h.view_as(h)

    @staticmethod
    def backward(ctx, dh, dh2):
        gate_up, delta, routing = ctx.saved_tensors
        if dh is None:
            dh, dh2 = dh2, None
        rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
        d_gate_up = torch.empty_like(gate_up)
        needs_dr = ctx.has_routing and ctx.needs_input_grad[2]
        d_routing = torch.empty_like(routing) if needs_dr else None
        dh = dh.contiguous()
        _kernels().gated_backward[(triton_cdiv(rows, GATE_ROWS),)](
            dh, dh2.contiguous() if dh2 is not None else dh, gate_up, delta if ctx.has_delta else gate_up,
            routing if ctx.has_routing else gate_up, d_gate_up, d_routing if needs_dr else gate_up, rows, inter,
            HAS_DH2=dh2 is not None, HAS_DELTA=ctx.has_delta, HAS_ROUTING=ctx.has_routing, NEEDS_DR=needs_dr,
            BM=GATE_ROWS, BN=GATE_COLS, num_warps=4)
        return d_gate_up, d_gate_up if ctx.has_delta else None, d_routing


class Combine(torch.autograd.Function):
    """out[t] = sum over j < k of (y + delta)[inverse[t k + j]]: the experts' rows back in token order, each token's
    k rows summed. `token[row]` is the token of each row of y (inverse's inverse, divided by k)."""

    @staticmethod
    def forward(ctx, y, delta, inverse, token, k: int):
        ctx.save_for_backward(token)
        ctx.has_delta = delta is not None
        return gather_sum(y, inverse, k, delta)

    @staticmethod
    def backward(ctx, grad):
        (token,) = ctx.saved_tensors
        d_y = grad[token]
        return d_y, d_y if ctx.has_delta else None, None, None, None


def gather_sum(x: torch.Tensor, index: torch.Tensor, k: int, delta: torch.Tensor | None = None) -> torch.Tensor:
    """sum over j < k of (x + delta)[index[t k + j]] for each t, in x's dtype (summed in fp32); no autograd."""
    tokens, width = index.shape[0] // k, x.shape[1]
    out = x.new_empty(tokens, width)
    _kernels().gather_sum[(tokens, triton_cdiv(width, SUM_COLS))](
        x, delta if delta is not None else x, index, out, width, k, HAS_DELTA=delta is not None, BN=SUM_COLS,
        num_warps=4)
    return out


def gated_activation(gate_up, delta, routing) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, h again): one for the down projection's base product, one for its adapter (their input gradients meet in
    this function's backward kernel, not in a separate addition)."""
    return GatedActivation.apply(gate_up, delta, routing)


def combine(y, delta, inverse, token, k: int):
    return Combine.apply(y, delta, inverse, token, k)


def triton_cdiv(n: int, block: int) -> int:
    return -(-n // block)
