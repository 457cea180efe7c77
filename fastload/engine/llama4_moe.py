"""Llama-4's mixture-of-experts layer with each token through its chosen experts only.

transformers' Llama4TextMoe sends every token through every expert, its input scaled by the router's score (zero for
the experts not chosen), and sums the outputs: Llama-4 Scout's 16 experts with one chosen per token do 16 times the
expert work a routed layer does, and peft's adapters on the fused expert weights build W + s B A for every expert
on every call. Here the router's top-k choices pick the rows: each token scaled by its score, then the routed
low-rank expert path of fastload.engine.expert_lora (grouped matmuls, 4-bit stacks dequantized per projection).
An expert not chosen adds exactly zero in transformers' sum (no biases, and silu(0) * 0 = 0), so the routed sum
is the same sum. Patched per instance on Llama4TextMoe; any call the lever cannot compute goes to its own forward.
"""

from __future__ import annotations

import functools
import types

import torch

from fastload.engine.expert_lora import LEVER, active_factors, experts_forward, wrapper_chain
from fastload.model_state import is_patched, mark_patched

MOE_CLASS, EXPERTS_CLASS = "Llama4TextMoe", "Llama4TextExperts"


class Llama4Layout:
    """Llama4TextExperts read as transformers' experts layout: weights stored (experts, in, out) ("transposed"),
    gate and up concatenated in gate_up_proj (gate first), no biases."""

    has_gate, has_bias, is_transposed, is_concatenated = True, False, True, True

    def __init__(self, experts) -> None:
        self.experts = experts
        self.num_experts = experts.num_experts
        self.act_fn = experts.act_fn

    @property
    def gate_up_proj(self):
        return self.experts.gate_up_proj

    @property
    def down_proj(self):
        return self.experts.down_proj


@functools.cache
def _layout_class() -> type:
    """Llama4Layout with transformers' default experts gate, silu(gate) * up (what Llama-4 computes as
    up * silu(gate)): the experts' Triton gate kernel recognises it by that function (imported at the first call,
    as fastload.engine.expert_lora does)."""
    from transformers.integrations.moe import _default_apply_gate

    return type("Llama4Layout", (Llama4Layout,), {"_apply_gate": _default_apply_gate})


def _experts_and_factors(moe):
    """(Llama4TextExperts, {projection: factors}) for this call, or None when it must take transformers' forward
    (adapters disabled, merged or several active; experts wrapped by something other than peft)."""
    from peft.tuners.lora.layer import ParamWrapper

    outer = moe.experts
    if isinstance(outer, ParamWrapper):
        experts = outer.get_base_layer()
        factors = active_factors(wrapper_chain(outer), experts)
        if factors is None or set(factors) - {"gate_up_proj", "down_proj"}:
            return None
    else:
        experts, factors = outer, {}
    if type(experts).__name__ != EXPERTS_CLASS or torch.nn.utils.parametrize.is_parametrized(experts):
        return None
    return experts, _as_stored(factors, experts)


def _as_stored(factors: dict, experts) -> dict:
    """The factors for x W with W stored (experts, in, out). peft reads a 3-D parameter as (experts, out, in) unless
    its module says `is_transposed` (Llama-4's does not): its update s B A then has B on the stored input side, so
    x (W + s B A) = x W + s (x B) A, i.e. the roles of A^T and B^T swap. The first factor is made contiguous in
    the weight's dtype (B's transpose has no unit stride in its last two axes, which grouped_mm needs: the per-expert
    loop, with a host sync, took it otherwise); the second is made so by the projection."""
    if getattr(experts, "is_transposed", False):
        return factors
    return {name: (_contiguous_in(b_t.transpose(-2, -1), getattr(experts, name).dtype), a_t.transpose(-2, -1), scaling)
            for name, (a_t, b_t, scaling) in factors.items()}


def _contiguous_in(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t as a row-major tensor of `dtype`, in one copy that autograd follows (Tensor.to keeps a permuted layout
    when only the memory format would change)."""
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    return out.copy_(t)


def _routed_forward(self, hidden_states):
    found = _experts_and_factors(self)
    if found is None or not hidden_states.is_floating_point():
        return type(self).forward(self, hidden_states)
    experts, factors = found
    hidden = hidden_states.reshape(-1, self.hidden_dim)
    scores, logits = self.router(hidden)
    chosen = torch.topk(logits, self.top_k, dim=1).indices  # the router's own choice (the same call)
    routed = experts_forward(_layout_class()(experts), factors, hidden, chosen, scores.gather(1, chosen),
                             scale_inputs=True)
    out = self.shared_expert(hidden)
    return out + routed.to(out.dtype), logits


def install_llama4_moe(model) -> int:
    """Give each Llama4TextMoe of the model the routed forward; returns how many got it now. The experts' outermost
    peft wrapper is marked with the expert lever too, so the engine report counts its experts as computed; adapters
    added after the first install (get_peft_model on a model loaded without LoRA) are marked on the next call."""
    from peft.tuners.lora.layer import ParamWrapper

    count = 0
    for module in model.modules():
        if type(module).__name__ != MOE_CLASS:
            continue
        if not is_patched(model, module, LEVER):
            module.forward = types.MethodType(_routed_forward, module)
            mark_patched(model, module, LEVER)
            count += 1
        if isinstance(module.experts, ParamWrapper) and not is_patched(model, module.experts, LEVER):
            mark_patched(model, module.experts, LEVER)
    return count
