"""LoRA targets found from the model's structure, and adapters added with peft."""

from __future__ import annotations

from typing import Any

from fastload._log import logger
from fastload.errors import AdapterError, UnsupportedArchitecture
from fastload.settings import LoraSettings
from fastload.structure import decoder_layers, is_linear


def _router_widths(config) -> set[int]:
    """Output widths of MoE routers (one logit per expert): linear, but not projections to adapt."""
    widths = set()
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            widths.add(value)
    return widths


def find_lora_targets(model) -> list[str]:
    """Leaf names of every linear projection inside the decoder layers (q_proj, ..., down_proj for Llama)."""
    layers = decoder_layers(model)
    if layers is None:
        raise UnsupportedArchitecture(f"Finding LoRA targets in {type(model).__name__}",
                                      found="no list of repeated decoder layers in the model",
                                      fix="pass lora={'target_modules': [...]} naming the linear layers to adapt")
    skip_widths = _router_widths(getattr(model, "config", None))
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


def has_adapters(model) -> bool:
    return bool(getattr(model, "peft_config", None))


def apply_lora(model, settings: LoraSettings, random_state: int | None = None):
    """Wrap the model with peft LoRA adapters; only the adapters train, kept in fp32; nothing else is upcast."""
    import torch
    from peft import LoraConfig, get_peft_model

    targets = list(settings.target_modules) if settings.target_modules else find_lora_targets(model)
    leaf_names = {n.split(".")[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaf_names]
    if missing:
        raise AdapterError(f"Adding LoRA on {targets}", found=f"the model has no module named {missing}",
                           fix=f"leave target_modules unset (found: {find_lora_targets(model)}) or fix the names")
    try:
        config = LoraConfig(r=settings.r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                            bias=settings.bias, target_modules=targets, task_type="CAUSAL_LM", **settings.extra)
    except TypeError as e:
        raise AdapterError("Building the LoRA config", found=str(e), fix="pass only peft.LoraConfig fields in lora=") from e
    if random_state is not None:
        torch.manual_seed(random_state)
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    for name, p in peft_model.named_parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info("LoRA r=%s alpha=%s on %s: %s trainable parameters (%.2f%% of %s)", settings.r, settings.lora_alpha,
                ",".join(targets), f"{trainable:,}", 100 * trainable / max(total, 1), f"{total:,}")
    return peft_model


def lora_settings_of(model) -> dict[str, Any]:
    cfg = getattr(model, "peft_config", {}).get("default")
    return cfg.to_dict() if cfg is not None else {}
