"""What Unsloth's get_peft_model does besides adding LoRA: checkpointing on or off, max_seq_length, target groups,
and replacing an adapter nobody trained yet."""

from __future__ import annotations

from typing import Any

from fastload._log import logger

ATTENTION_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv",
                   "out_proj", "dense", "query", "key", "value"}
# fastload's attributes on a loaded model: carried over when the model object changes (unload, new peft wrapper)
MODEL_ATTRS = ("max_seq_length", "fastload_plan", "fastload_backend", "fastload_engine_settings", "fastload_engine",
               "_fastload_checkpointing")


def untrained_adapter(model) -> bool:
    """peft starts every lora_B at zero, so all-zero B matrices mean no training step and no loaded save: replacing
    the adapter loses nothing."""
    import torch

    b_matrices = [p for name, p in model.named_parameters() if "lora_B" in name]
    return bool(b_matrices) and all(not torch.count_nonzero(p) for p in b_matrices)


def unload_adapter(model):
    """The base model without its LoRA layers, keeping fastload's attributes."""
    base = model.unload()
    for attr in MODEL_ATTRS:
        if hasattr(model, attr):
            setattr(base, attr, getattr(model, attr))
    return base


def target_groups_settings(model, lora_options: dict[str, Any], asked: dict[str, Any]) -> dict[str, Any]:
    """Unsloth's finetune_attention_modules / finetune_mlp_modules: the projections of the groups kept."""
    groups = asked.get("target_groups")
    if not groups:
        return lora_options
    from fastload.train.checkpointing import _base
    from fastload.train.lora import find_lora_targets

    found = find_lora_targets(_base(model))
    targets = [t for t in found if (t in ATTENTION_NAMES and groups["attention"])
               or (t not in ATTENTION_NAMES and groups["mlp"])]
    logger.info("LoRA targets from finetune_attention_modules=%s, finetune_mlp_modules=%s: %s", groups["attention"],
                groups["mlp"], ",".join(targets))
    return {**lora_options, "target_modules": targets}


def apply_peft_extras(model, asked: dict[str, Any]):
    """max_seq_length and use_gradient_checkpointing=False as get_peft_model was asked; returns the model."""
    from fastload.train.checkpointing import _base, is_checkpointing, turn_off_checkpointing

    if "max_seq_length" in asked:
        model.max_seq_length = asked["max_seq_length"]
    if asked.get("gradient_checkpointing") is False and is_checkpointing(model):
        turn_off_checkpointing(_base(model))
        model._fastload_checkpointing = False
        engine = getattr(model, "fastload_engine", None)
        if engine:
            model.fastload_engine = [lever for lever in engine if lever not in ("offload_checkpointing", "cuda_graphs")]
        logger.info("gradient checkpointing: off, as asked (use_gradient_checkpointing=False)")
    return model
