"""Mixture-of-experts routers computed by one Triton kernel each way (fastload.engine.triton.router).

A router takes the kernel only where its forward is shown, at install, to compute what the kernel does: transformers'
`*TopKRouter` modules (Qwen2/3-MoE, OLMoE, Mixtral and their kin) are a linear layer, softmax in fp32, top-k,
optionally a renormalisation, optionally a cast back. The install runs the module's own forward on a few random rows
and keeps the patch only if one of those variants gives the same experts and weights; routers with a bias, a
correction buffer, grouped or sigmoid scoring fail that check (or the attribute check before it) and keep their own
forward.
"""

from __future__ import annotations

import types

import torch

from fastload._log import logger
from fastload.engine.triton import router as triton_router
from fastload.engine.triton.launch import triton_runs_on
from fastload.model_state import is_patched, mark_patched

LEVER = "triton_router"


def install_topk_router(model) -> bool:
    """Patch every router of this model whose forward the kernel computes; True where any is patched."""
    patched = False
    for module in model.modules():
        if not _looks_like_topk_router(module) or module.weight.shape[0] > triton_router.MAX_EXPERTS:
            continue
        if is_patched(model, module, LEVER):
            patched = True
            continue
        variant = matching_variant(module)
        if variant is None:
            logger.debug("%s: %s computes something else than softmax-top-k routing: its own forward kept", LEVER,
                         type(module).__name__)
            continue
        module.forward = types.MethodType(_routed_forward(module.forward, *variant), module)
        mark_patched(model, module, LEVER)
        patched = True
    return patched


def _looks_like_topk_router(module) -> bool:
    """A router holding exactly one (experts, hidden) weight and nothing else, with its top_k."""
    if not type(module).__name__.endswith("TopKRouter") or not isinstance(getattr(module, "top_k", None), int):
        return False
    params = dict(module.named_parameters(recurse=False))
    buffers = dict(module.named_buffers(recurse=False))
    weight = params.get("weight")
    return (set(params) == {"weight"} and not buffers and not module._modules and weight is not None
            and weight.dim() == 2 and weight.is_floating_point())


def matching_variant(module) -> tuple[bool, bool] | None:
    """(normalize, cast back to the logits' dtype) for which softmax-top-k equals the module's own forward on random
    rows, or None."""
    weight = module.weight
    if weight.device.type == "meta":  # offloaded by accelerate: its values are elsewhere
        return None
    generator = torch.Generator(device="cpu").manual_seed(0)
    rows = torch.randn(8, weight.shape[1], generator=generator).to(weight.device, weight.dtype)
    with torch.no_grad():
        try:
            out = module.forward(rows)
        except Exception as e:  # noqa: BLE001 - a router that does not take plain rows is not this kind
            logger.debug("%s: %s refused probe rows (%s: %s)", LEVER, type(module).__name__, type(e).__name__, e)
            return None
        if not (isinstance(out, tuple) and len(out) == 3):
            return None
        logits, weights, experts = out
        if not torch.equal(logits, torch.nn.functional.linear(rows, weight)):
            return None
        top_k = experts.shape[-1] if torch.is_tensor(experts) and experts.dim() == 2 else None
        if top_k != module.top_k or not torch.is_tensor(weights) or weights.shape != experts.shape:
            return None
        cast = weights.dtype == logits.dtype
        if not cast and weights.dtype != torch.float32:
            return None
        for normalize in (True, False):
            expected, chosen = triton_router.reference_routing(logits, top_k, normalize, weights.dtype)
            if torch.equal(chosen, experts) and torch.allclose(weights.float(), expected.float(), rtol=1e-3,
                                                               atol=1e-6):
                return normalize, cast
    return None


def _routed_forward(original, normalize: bool, cast: bool):
    def forward(self, hidden_states, *args, **kwargs):
        weight = self.weight
        if args or kwargs or not triton_runs_on(hidden_states) or hidden_states.dtype != weight.dtype:
            return original(hidden_states, *args, **kwargs)
        logits = torch.nn.functional.linear(hidden_states.reshape(-1, weight.shape[1]), weight)
        dtype = logits.dtype if cast else torch.float32
        if not triton_router.routing_kernel_runs(logits.device, logits.dtype, logits.shape[-1], self.top_k, normalize,
                                                 dtype):
            return original(hidden_states)
        weights, experts = triton_router.topk_routing(logits, self.top_k, normalize, dtype)
        return logits, weights, experts

    return forward
