"""The Triton kernels behind fastload.engine.triton.router (imported at the first launch: it imports triton).

One program per token: the row of router logits (at most BLOCK_E experts) is read once, its softmax and top-k are
computed in fp32 as torch's softmax(dtype=float32) and topk compute them, and the k weights are written in the
output's dtype. Ties go to the lower expert index."""

import triton
import triton.language as tl


@triton.jit
def _probabilities(logits_ptr, row, n_experts, BLOCK_E: tl.constexpr):
    experts = tl.arange(0, BLOCK_E)
    logits = tl.load(logits_ptr + row * n_experts + experts, mask=experts < n_experts,
                     other=float("-inf")).to(tl.float32)
    shifted = tl.exp(logits - tl.max(logits, axis=0))
    return experts, shifted / tl.sum(shifted, axis=0)


@triton.jit
def topk_routing_forward(logits_ptr, weights_ptr, indices_ptr, n_experts, K: tl.constexpr,
                         NORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """weights[t] = the k largest softmax probabilities of logits[t] (divided by their sum with NORMALIZE),
    indices[t] their experts, largest first."""
    row = tl.program_id(0).to(tl.int64)
    experts, probs = _probabilities(logits_ptr, row, n_experts, BLOCK_E)
    slots = tl.arange(0, BLOCK_K)
    chosen = tl.zeros((BLOCK_K,), dtype=tl.float32)
    where = tl.zeros((BLOCK_K,), dtype=tl.int64)
    left = tl.where(experts < n_experts, probs, -1.0)
    for j in range(K):
        best = tl.max(left, axis=0)
        index = tl.min(tl.where(left == best, experts, BLOCK_E), axis=0)  # the lowest index among equals
        chosen = tl.where(slots == j, best, chosen)
        where = tl.where(slots == j, index.to(tl.int64), where)
        left = tl.where(experts == index, -1.0, left)
    if NORMALIZE:
        chosen = chosen / tl.sum(chosen, axis=0)
    mask = slots < K
    tl.store(weights_ptr + row * K + slots, chosen.to(weights_ptr.dtype.element_ty), mask=mask)
    tl.store(indices_ptr + row * K + slots, where, mask=mask)


@triton.jit
def topk_routing_backward(grad_ptr, logits_ptr, indices_ptr, grad_logits_ptr, n_experts, K: tl.constexpr,
                          NORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr):
    """The logits' gradient from the k weights' gradient g. With NORMALIZE the weights are the softmax of the k
    chosen logits: g_l[j] = w_j (g_j - sum_i g_i w_i) on the chosen experts, 0 elsewhere. Without, they are the
    full softmax's p at the chosen experts: g_l[j] = p_j ([j chosen] g_j - sum_i g_i p_i) on every expert."""
    row = tl.program_id(0).to(tl.int64)
    experts, probs = _probabilities(logits_ptr, row, n_experts, BLOCK_E)
    grad = tl.zeros((BLOCK_E,), dtype=tl.float32)
    chosen = tl.zeros((BLOCK_E,), dtype=tl.int1)
    for j in range(K):
        index = tl.load(indices_ptr + row * K + j)
        hit = experts == index
        grad = tl.where(hit, tl.load(grad_ptr + row * K + j).to(tl.float32), grad)
        chosen = chosen | hit
    if NORMALIZE:
        probs = tl.where(chosen, probs, 0.0)
        probs = probs / tl.sum(probs, axis=0)
    dot = tl.sum(grad * probs, axis=0)
    tl.store(grad_logits_ptr + row * n_experts + experts, (probs * (grad - dot)).to(grad_logits_ptr.dtype.element_ty),
             mask=experts < n_experts)
