"""What a loaded model is made of: its decoder layers and the kinds of its linear layers.

One home for module-kind checks: `isinstance` against the real classes. bitsandbytes' classes are looked up only
when bitsandbytes is already imported — a model cannot hold its layers otherwise — so these checks import nothing.
"""

from __future__ import annotations

import sys

import torch


def _bnb_class(name: str):
    nn = sys.modules.get("bitsandbytes.nn")
    return getattr(nn, name, None) if nn is not None else None


def is_linear4bit(module) -> bool:
    """A bitsandbytes 4-bit (NF4/FP4) linear layer."""
    cls = _bnb_class("Linear4bit")
    return cls is not None and isinstance(module, cls)


def is_linear8bit(module) -> bool:
    """A bitsandbytes LLM.int8 linear layer."""
    cls = _bnb_class("Linear8bitLt")
    return cls is not None and isinstance(module, cls)


def is_quantized_linear(module) -> bool:
    return is_linear4bit(module) or is_linear8bit(module)


def is_plain_linear(module) -> bool:
    """torch's own Linear (16/32-bit weights), not a quantized subclass."""
    return isinstance(module, torch.nn.Linear) and not is_quantized_linear(module)


def is_linear(module) -> bool:
    """Anything LoRA can target as a projection: torch Linear, its quantized subclasses, other libraries' quantized
    linears that peft also adapts."""
    return isinstance(module, torch.nn.Linear) or class_named(module, ("Linear1D", "QuantLinear"))


def stored_transposed(module) -> bool:
    """A bitsandbytes layer that replaced transformers' Conv1D (GPT-2): checkpoints keep its weight (in, out), the
    layer (out, in); transformers' quantizer transposes it on the way in."""
    source = getattr(module, "source_cls", None)
    if not isinstance(source, type):
        return False
    from transformers.pytorch_utils import Conv1D

    return issubclass(source, Conv1D)


def class_named(module, names) -> bool:
    """For transformers' per-architecture classes (LlamaRMSNorm, Qwen2MLP, ...): one name per family, no common base."""
    return type(module).__name__ in names


def router_widths(config) -> set[int]:
    """Output widths of mixture-of-experts routers (one logit per expert): the expert counts a config names."""
    widths = set()
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            widths.add(value)
    return widths


# names a router or one of its parts goes by in transformers' MoE blocks: Mixtral's `gate`, Hunyuan's `gate.wg`,
# LongCat's `router.classifier`, DBRX's and JetMoE's `router.layer`, Gemma-4's `router.proj`, ZAYA's
# `gate.router_mlp.out_proj`
ROUTER_NAMES = ("gate", "wg", "classifier")
ROUTER_PARTS = ("router", "gating")


def is_router(path: str, module, widths: set[int]) -> bool:
    """A linear layer giving one logit per expert: as wide as the config's expert count and named as a router (or
    inside one). The width alone is no proof: a small model's q_proj can be as wide as it has experts."""
    if getattr(module, "out_features", None) not in widths:
        return False
    parts = path.split(".")
    return any(part in ROUTER_NAMES or any(word in part for word in ROUTER_PARTS) for part in parts)


def decoder_layers(model):
    """The ModuleList of repeated decoder blocks: the largest ModuleList whose items share one class; in a hybrid
    whose blocks are of several classes (Jamba's Mamba and attention layers, Zamba2's Mamba and hybrid layers), the
    ModuleList holding the most parameters, when it holds more than that uniform one (Zamba2's longest uniform list
    is a one-item list of its own adapters)."""
    best, mixed = None, []
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1:
                if best is None or len(module) > len(best):
                    best = module
            else:
                mixed.append(module)
    if mixed:  # counted only where a list of several classes exists: most models have none
        heaviest = max(mixed, key=_parameter_count)
        if best is None or _parameter_count(heaviest) > _parameter_count(best):
            best = heaviest
    return best


def _parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())
