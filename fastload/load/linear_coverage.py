"""Linear layers a quantized load left in 16-bit because of their class, said at load.

transformers' bitsandbytes integration replaces layers whose type is exactly torch.nn.Linear: a model whose
projections are a subclass (Falcon's FalconLinear) loads and trains with them in 16-bit, silently, so its memory is
not what 4-bit implies. The load says how many, of which class, and what share of the weights they hold.
"""

from __future__ import annotations

import torch

from fastload._log import logger
from fastload.structure import decoder_layers, is_quantized_linear


def linear_subclasses_left(model) -> tuple[dict[str, int], int]:
    """({class name: layers} of the decoder's unquantized nn.Linear subclasses, their weights' elements)."""
    classes: dict[str, int] = {}
    elements = 0
    for layer in decoder_layers(model) or []:
        for module in layer.modules():
            if (isinstance(module, torch.nn.Linear) and type(module) is not torch.nn.Linear
                    and not is_quantized_linear(module)):
                classes[type(module).__name__] = classes.get(type(module).__name__, 0) + 1
                elements += module.weight.numel()
    return classes, elements


def note_unquantized_linears(model, quantized: bool) -> None:
    """Warn once, at load, when a quantized load kept linear layers in 16-bit because of their class."""
    if not quantized:
        return
    classes, elements = linear_subclasses_left(model)
    if not classes:
        return
    total = sum(p.numel() for p in model.parameters())
    names = ", ".join(f"{n} {cls}" for cls, n in sorted(classes.items()))
    logger.warning("%s layers (%s elements, %.0f%% of the weights) stay in %s: transformers' bitsandbytes "
                   "integration quantizes torch.nn.Linear itself, not subclasses of it (LoRA, where it targets them, "
                   "adapts them in 16-bit), and the model needs that much more memory than 4-bit implies",
                   names, f"{elements:,}", 100 * elements / max(total, 1), str(model.dtype).replace("torch.", ""))
