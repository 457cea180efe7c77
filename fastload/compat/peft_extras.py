"""What Unsloth's get_peft_model does besides adding LoRA: checkpointing on or off, max_seq_length, target groups,
and unloading an adapter nobody trained yet (train.lora.untrained_adapter tells) before adding the one asked."""

from __future__ import annotations

from typing import Any

from fastload._log import logger

ATTENTION_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv",
                   "out_proj", "dense", "query", "key", "value"}
# attributes a peft wrapper may hold itself, carried over when it is unloaded (fastload's own state sits on the
# model under the wrapper: model_state.py)
MODEL_ATTRS = ("max_seq_length",)


def unload_adapter(model):
    """The base model without its LoRA layers, keeping max_seq_length (its fastload state is on it already)."""
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
    from fastload.train.checkpointing import disable_checkpointing, is_checkpointing

    if "max_seq_length" in asked:
        model.max_seq_length = asked["max_seq_length"]
    if asked.get("gradient_checkpointing") is False and is_checkpointing(model):
        disable_checkpointing(model)  # the engine's checkpointing levers leave its report with it
        logger.info("gradient checkpointing: off, as asked (use_gradient_checkpointing=False)")
    return model
