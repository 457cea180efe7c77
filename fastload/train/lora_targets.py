"""Which linear layers LoRA adapts by default: every projection inside the decoder layers.

Its own module so that the load (which predicts the adapters while it reads) and apply_lora share it without
importing each other.
"""

from __future__ import annotations

from fastload.errors import UnsupportedArchitecture
from fastload.structure import decoder_layers, is_linear, router_widths


def find_lora_targets(model) -> list[str]:
    """Leaf names of every linear projection inside the decoder layers (q_proj, ..., down_proj for Llama); routers
    and scalar gates are not projections."""
    layers = decoder_layers(model)
    if layers is None:
        raise UnsupportedArchitecture(f"Finding LoRA targets in {type(model).__name__}",
                                      found="no list of repeated decoder layers in the model",
                                      fix="pass lora={'target_modules': [...]} naming the linear layers to adapt")
    # routers (one logit per expert) and scalar gates (Qwen2-MoE's shared_expert_gate: one output) are never adapted
    skip_widths = router_widths(getattr(model, "config", None)) | {1}
    names: set[str] = set()
    for layer in layers:
        for full, module in layer.named_modules():
            if full and is_linear(module) and getattr(module, "out_features", None) not in skip_widths:
                names.add(full.split(".")[-1])
    if not names:
        raise UnsupportedArchitecture(f"Finding LoRA targets in {type(model).__name__}",
                                      found=f"its {len(layers)} decoder layers hold no linear projections",
                                      fix="pass lora={'target_modules': [...]} naming the layers to adapt")
    return sorted(names)
