"""A mixture-of-experts router's softmax, top-k and renormalisation, one Triton launch each way.

transformers' top-k routers compute softmax(logits, fp32), topk, a sum and a division, then a cast: six launches
forward, about eleven backward (the cast's, the division's, the sum's, topk's scatter, softmax's), each on a tiny
(tokens x experts) tensor, and under checkpointing the forward runs twice. Here one kernel reads each token's logits
and writes its k weights and experts; its backward is one kernel too."""

from __future__ import annotations

import torch

from fastload.engine.triton.launch import kernel_probe, launch

MAX_EXPERTS = 1024  # one program holds a token's logits in registers


def _kernels():
    from fastload.engine.triton import router_kernels

    return router_kernels


def _block(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


class TopKRouting(torch.autograd.Function):
    """(weights, experts) of the k largest softmax probabilities of each row of `logits`."""

    @staticmethod
    def forward(ctx, logits, k: int, normalize: bool, dtype):
        logits = logits.contiguous()
        tokens, n_experts = logits.shape
        weights = torch.empty(tokens, k, dtype=dtype, device=logits.device)
        indices = torch.empty(tokens, k, dtype=torch.int64, device=logits.device)
        if tokens:
            launch(_kernels().topk_routing_forward, (tokens,),
                logits, weights, indices, n_experts, K=k, NORMALIZE=normalize, BLOCK_E=_block(n_experts),
                BLOCK_K=_block(k), num_warps=_warps(n_experts))
        ctx.save_for_backward(logits, indices)
        ctx.k, ctx.normalize = k, normalize
        ctx.mark_non_differentiable(indices)
        return weights, indices

    @staticmethod
    def backward(ctx, grad, _):
        logits, indices = ctx.saved_tensors
        tokens, n_experts = logits.shape
        grad_logits = torch.empty_like(logits)
        if tokens:
            launch(_kernels().topk_routing_backward, (tokens,),
                grad.contiguous(), logits, indices, grad_logits, n_experts, K=ctx.k, NORMALIZE=ctx.normalize,
                BLOCK_E=_block(n_experts), num_warps=_warps(n_experts))
        return grad_logits, None, None, None


def _warps(n_experts: int) -> int:
    return 1 if n_experts <= 128 else 4


def topk_routing(logits: torch.Tensor, k: int, normalize: bool, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's (weights in `dtype`, int64 experts), as `reference_routing` computes them."""
    return TopKRouting.apply(logits, k, normalize, dtype)


def reference_routing(logits: torch.Tensor, k: int, normalize: bool, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' top-k router after its linear layer, in torch ops."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, indices = torch.topk(probs, k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), indices


def routing_kernel_runs(device, logits_dtype, n_experts: int, k: int, normalize: bool, dtype) -> bool:
    """Whether this variant compiles and runs here, forward and backward (tried once on two rows)."""
    return kernel_probe(("router", str(device), logits_dtype, n_experts, k, normalize, dtype),
                        lambda: _probe(device, logits_dtype, n_experts, k, normalize, dtype))


def _probe(device, logits_dtype, n_experts: int, k: int, normalize: bool, dtype) -> None:
    logits = torch.zeros(2, n_experts, device=device, dtype=logits_dtype, requires_grad=True)
    weights, _ = topk_routing(logits * 1, k, normalize, dtype)
    torch.autograd.grad(weights.float().sum(), logits)
