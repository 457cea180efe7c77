"""What 4-bit loading leaves in 16-bit: bitsandbytes quantizes Linear layers only, so the fused 3-D expert weights
of transformers 5's mixture-of-experts models (Mixtral, Qwen3-MoE, gpt-oss) stay in the compute dtype."""

from __future__ import annotations

from fastload._log import logger


def unquantized_expert_share(model) -> tuple[int, int]:
    """(elements in 3-D floating-point parameters, elements in all parameters) of a loaded model."""
    experts = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.ndim == 3 and p.is_floating_point():
            experts += p.numel()
    return experts, total


def note_unquantized_experts(model, quantized: bool, dtype) -> None:
    """Say once, at load, when a quantized load keeps expert weights in 16/32-bit: memory is not what 4-bit implies."""
    if not quantized:
        return
    experts, total = unquantized_expert_share(model)
    if experts:
        logger.warning("bitsandbytes quantizes Linear layers only: the experts' fused 3-D weights (%s elements, "
                       "%.0f%% of the stored ones) stay in %s", f"{experts:,}", 100 * experts / max(total, 1),
                       str(dtype).replace("torch.", ""))
