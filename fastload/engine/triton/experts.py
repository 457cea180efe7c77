"""The elementwise work around the experts' grouped matmuls, one Triton launch each way.

Between its grouped matmuls a mixture-of-experts layer in torch ops adds the adapter's rows, splits gate from up,
applies silu, multiplies, scales by the routing weights, then gathers each token's rows back and sums them: ten
launches forward, more backward, each a full pass over (routed tokens x width) tensors (32k x 2k for Qwen3-MoE at
2048 x 2). The gate kernel does the first five in one pass, the combine kernel the last three (and, run on the
spread's gradient, the spread's backward)."""

from __future__ import annotations

import torch

from fastload.engine.triton.launch import kernel_probe, launch
from fastload.train.single_use import graph_is_single_use

COLUMN_BLOCK = 1024


def _kernels():
    """The kernels module, imported at the first launch: this module stays importable where triton is not."""
    from fastload.engine.triton import experts_kernels

    return experts_kernels


def _warps(n_cols: int) -> int:
    return 4 if n_cols <= 1024 else 8


class ExpertsGate(torch.autograd.Function):
    """silu(gate) * up (* routing) for rows of [gate | up] (+ the adapter's [gate | up] rows), as transformers'
    default experts gate computes it."""

    @staticmethod
    def forward(ctx, gate_up, lora, routing):
        gate_up, lora, routing = (None if t is None else t.contiguous() for t in (gate_up, lora, routing))
        rows, n_cols = gate_up.shape[0], gate_up.shape[1] // 2
        out = gate_up.new_empty(rows, n_cols)
        if rows:
            launch(_kernels().experts_gate_forward, (rows,),
                gate_up, gate_up if lora is None else lora, gate_up if routing is None else routing, out, n_cols,
                HAS_LORA=lora is not None, HAS_ROUTING=routing is not None, BLOCK=COLUMN_BLOCK,
                num_warps=_warps(n_cols))
        ctx.save_for_backward(gate_up, routing)  # holding gate + lora when there is an adapter (written in forward)
        ctx.has_lora = lora is not None
        ctx.overwrite = graph_is_single_use()  # backward may write the gradient over gate_up
        return out

    @staticmethod
    def backward(ctx, grad):
        gate_up, routing = ctx.saved_tensors
        rows, n_cols = gate_up.shape[0], gate_up.shape[1] // 2
        d_routing = None if routing is None else torch.empty_like(routing)
        d_gate_up = gate_up if ctx.overwrite else torch.empty_like(gate_up)
        if rows:
            launch(_kernels().experts_gate_backward, (rows,),
                grad.contiguous(), gate_up, d_gate_up, gate_up if routing is None else routing,
                gate_up if d_routing is None else d_routing, n_cols,
                HAS_ROUTING=routing is not None, BLOCK=COLUMN_BLOCK, num_warps=_warps(n_cols))
        return d_gate_up, d_gate_up if ctx.has_lora else None, d_routing


class CombineRows(torch.autograd.Function):
    """out[t] = sum_j (rows + lora)[source[t*k + j]]; the gradient of rows (and of lora, the same) is
    grad_out[token_of_row]."""

    @staticmethod
    def forward(ctx, rows, lora, source, token_of_row, k: int, dtype):
        out = combine(rows, lora, source, k, dtype)
        ctx.save_for_backward(token_of_row)
        ctx.has_lora = lora is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        (token_of_row,) = ctx.saved_tensors
        grad_rows = grad[token_of_row]
        return grad_rows, grad_rows if ctx.has_lora else None, None, None, None, None


class SpreadRows(torch.autograd.Function):
    """hidden[token_of_row]; its gradient sums each token's k rows (found through `source`) in one launch."""

    @staticmethod
    def forward(ctx, hidden, token_of_row, source, k: int):
        ctx.save_for_backward(source)
        ctx.k = k
        return hidden[token_of_row]

    @staticmethod
    def backward(ctx, grad):
        (source,) = ctx.saved_tensors
        return combine(grad.contiguous(), None, source, ctx.k, grad.dtype), None, None, None


def combine(rows, lora, source, k: int, dtype) -> torch.Tensor:
    """Sum each token's k rows (rows + lora, rounded to rows' dtype first), read at `source`, in fp32."""
    rows, lora, source = (None if t is None else t.contiguous() for t in (rows, lora, source))
    tokens, n_cols = source.numel() // k, rows.shape[-1]
    out = torch.empty(tokens, n_cols, dtype=dtype, device=rows.device)
    if tokens:
        launch(_kernels().combine_rows, (tokens,), rows, rows if lora is None else lora, source, out, n_cols, K=k,
               HAS_LORA=lora is not None, BLOCK=COLUMN_BLOCK, num_warps=_warps(n_cols))
    return out


def experts_gate(gate_up, lora=None, routing=None):
    """transformers' default experts gate, silu(gate) * up, on contiguous [gate | up] rows; `lora` (same shape) is
    added first, its sum written over gate_up; `routing` (rows, 1) scales each output row."""
    return ExpertsGate.apply(gate_up, lora, routing)


def combine_rows(rows, lora, source, token_of_row, k: int, dtype):
    """Each token's k routed rows summed: rows[source].view(-1, k, width).sum(1) (rows + lora, if given)."""
    return CombineRows.apply(rows, lora, source, token_of_row, k, dtype)


def spread_rows(hidden, token_of_row, source, k: int):
    """hidden[token_of_row], with the k-row sum of combine as its backward."""
    return SpreadRows.apply(hidden, token_of_row, source, k)


def kernel_runs(kind: str, device, dtype, *shape) -> bool:
    """Whether this variant of a kernel ("gate": width, adapter, routing; "combine": width, k, adapter; "spread": width,
    k) compiles and runs here, forward and backward (`kernel_probe`)."""
    return kernel_probe((kind, str(device), dtype, *shape), lambda: _PROBES[kind](device, dtype, *shape))


def _probe_gate(device, dtype, width: int, adapter: bool, routed: bool) -> None:
    gate_up = torch.zeros(2, 2 * width, device=device, dtype=dtype, requires_grad=True)
    lora = torch.zeros_like(gate_up, requires_grad=True) if adapter else None
    routing = torch.ones(2, 1, device=device, dtype=dtype, requires_grad=True) if routed else None
    inputs = [t for t in (gate_up, lora, routing) if t is not None]
    torch.autograd.grad(experts_gate(gate_up * 1, lora, routing).sum(), inputs)


def _probe_combine(device, dtype, width: int, k: int, adapter: bool) -> None:
    rows = torch.zeros(2 * k, width, device=device, dtype=dtype, requires_grad=True)
    lora = torch.zeros_like(rows, requires_grad=True) if adapter else None
    source = torch.arange(2 * k, device=device)
    combined = combine_rows(rows, lora, source, source // k, k, dtype)
    torch.autograd.grad(combined.sum(), [t for t in (rows, lora) if t is not None])


def _probe_spread(device, dtype, width: int, k: int) -> None:
    hidden = torch.zeros(2, width, device=device, dtype=dtype, requires_grad=True)
    source = torch.arange(2 * k, device=device)
    torch.autograd.grad(spread_rows(hidden, source // k, source, k).sum(), hidden)


_PROBES = {"gate": _probe_gate, "combine": _probe_combine, "spread": _probe_spread}
