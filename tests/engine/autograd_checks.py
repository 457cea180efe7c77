"""Autograd checks the MoE engine tests share: a loss with its gradients, relative differences, and what autograd keeps
between forward and backward (the memory a step holds, measurable on the CPU)."""

from __future__ import annotations


def saved_for_backward_bytes(model, ids) -> int:
    """Bytes of the tensors autograd keeps for backward during one forward, each storage once; parameters (a 4-bit
    expert stack by its packed bytes) are not counted."""
    def storage_of(t):
        return getattr(t, "packed", t).untyped_storage()

    params = {storage_of(p).data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = storage_of(t)
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    import torch

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss
    return sum(kept.values())


def loss_and_grads(model, ids):
    """One training-mode forward and backward: (loss, {trained parameter name: its gradient in fp32})."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def relative(a, b) -> float:
    """|a - b| / |b|, for tensors that should agree."""
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
