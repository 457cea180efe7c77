"""Which linear layers LoRA adapts by default: every projection inside the decoder layers.

Its own module so that the load (which predicts the adapters while it reads) and apply_lora share it without
importing each other.
"""

from __future__ import annotations

from fastload.errors import UnsupportedArchitecture
from fastload.layer_rules import left_alone_by_lora
from fastload.structure import decoder_layers, is_linear, is_router, router_widths


def left_alone(model) -> dict[str, str]:
    """Leaf name -> why, for the layers LoRA never adapts in this model's family (fastload/layer_rules.toml)."""
    return left_alone_by_lora(getattr(getattr(model, "config", None), "model_type", None))


def find_lora_targets(model) -> list[str]:
    """Leaf names of every linear projection inside the decoder layers (q_proj, ..., down_proj for Llama); routers
    and scalar gates are not projections, and a family's layers fastload/layer_rules.toml names are left alone."""
    layers = decoder_layers(model)
    if layers is None:
        raise UnsupportedArchitecture(f"Finding LoRA targets in {type(model).__name__}",
                                      found="no list of repeated decoder layers in the model",
                                      fix="pass lora={'target_modules': [...]} naming the linear layers to adapt")
    # routers (one logit per expert) and scalar gates (Qwen2-MoE's shared_expert_gate: one output) are never adapted
    routers = router_widths(getattr(model, "config", None))
    names: set[str] = set()
    never = set(left_alone(model))
    for layer in layers:
        for full, module in layer.named_modules():
            leaf = full.split(".")[-1]
            # a linear layer inside a list (Zamba2's own per-block adapters) is named by its index, which peft would
            # match against every module of that index, decoder layer 0 included: never a default target
            if full and is_linear(module) and getattr(module, "out_features", None) != 1 \
                    and not is_router(full, module, routers) and not leaf.isdigit():
                names.add(leaf)
    names -= never
    if not names:
        raise UnsupportedArchitecture(f"Finding LoRA targets in {type(model).__name__}",
                                      found=f"its {len(layers)} decoder layers hold no linear projections",
                                      fix="pass lora={'target_modules': [...]} naming the layers to adapt")
    return sorted(names)
