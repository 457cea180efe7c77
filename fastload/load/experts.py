"""What 4-bit loading leaves in 16-bit: bitsandbytes quantizes Linear layers only, so the fused 3-D expert weights
of transformers 5's mixture-of-experts models (Mixtral, Qwen3-MoE, gpt-oss) stay in the compute dtype."""

from __future__ import annotations

from fastload._log import logger
from fastload.structure import decoder_layers, router_widths


def expert_weights(layers, config) -> list:
    """The fused expert weights in decoder layers: 3-D floating-point parameters whose first axis counts the experts
    (a vision tower's 3-D probe or a convolution is not one)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    experts = router_widths(text)
    return [p for layer in layers for p in layer.parameters()
            if p.ndim == 3 and p.is_floating_point() and p.shape[0] in experts]


def unquantized_expert_share(model) -> tuple[int, int]:
    """(elements in fused expert weights, elements in all parameters) of a loaded model."""
    experts = sum(p.numel() for p in expert_weights(decoder_layers(model) or [], model.config))
    return experts, sum(p.numel() for p in model.parameters())


def note_unquantized_experts(model, quantized: bool, dtype) -> None:
    """Say once, at load, when a quantized load keeps expert weights in 16/32-bit: memory is not what 4-bit implies."""
    if not quantized:
        return
    experts, total = unquantized_expert_share(model)
    if experts:
        logger.warning("bitsandbytes quantizes Linear layers only: the experts' fused 3-D weights (%s elements, "
                       "%.0f%% of the stored ones) stay in %s", f"{experts:,}", 100 * experts / max(total, 1),
                       str(dtype).replace("torch.", ""))
