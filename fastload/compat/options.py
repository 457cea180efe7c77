"""Unsloth's keyword names for loading and for adding LoRA, translated to fastload's; no heavy import here.

FastModel (fastload's own facade) and FastLanguageModel (the Unsloth surface) both read these tables, so a
notebook's `from_pretrained(..., use_gradient_checkpointing="unsloth")` or `get_peft_model(..., loftq_config=None)`
means the same thing through either. Options that mean nothing here are accepted and logged once.
"""

from __future__ import annotations

from typing import Any

from fastload._log import logger
from fastload.errors import InvalidOption

# Unsloth load options with no effect in fastload (vLLM, Unsloth's own compile and patching switches): accepted.
IGNORED_LOAD_OPTIONS = {
    "fix_tokenizer": "fastload keeps the tokenizer as published",
    "use_exact_model_name": "fastload resolves names through its registry and store",
    "fast_inference": "no vLLM engine here: generation uses transformers' generate",
    "gpu_memory_utilization": "no vLLM engine here",
    "float8_kv_cache": "no vLLM engine here",
    "max_lora_rank": "no vLLM engine here",
    "disable_log_stats": "no vLLM engine here",
    "unsloth_vllm_standby": "no vLLM engine here",
    "resize_model_vocab": "fastload does not resize the vocabulary at load",
    "return_logits": "the loss is computed as transformers computes it",
    "fullgraph": "fastload does not torch.compile the model",
    "unsloth_force_compile": "fastload does not torch.compile the model",
    "use_cache": "fastload switches the KV cache with for_inference / for_training",
    "auto_model": "fastload loads causal language models",
    "whisper_language": "fastload loads causal language models",
    "whisper_task": "fastload loads causal language models",
}
IGNORED_PEFT_OPTIONS = {
    "temporary_location": "fastload merges shard by shard without a temporary model copy",
    "ensure_weight_tying": "fastload saves tied weights once and keeps them tied",
    "finetune_vision_layers": "text models have no vision layers",
    "finetune_language_layers": "the decoder layers are what LoRA targets",
}
UNSLOTH_LOAD_NAMES = {"use_gradient_checkpointing", "full_finetuning", "load_in_16bit", *IGNORED_LOAD_OPTIONS}
_logged: set[str] = set()


def log_once(message: str, *args: Any) -> None:
    """One INFO line per distinct message in a process: a notebook cell run twice does not repeat it."""
    key = message % args if args else message
    if key not in _logged:
        _logged.add(key)
        logger.info(message, *args)


def checkpointing_flag(value: Any) -> bool:
    """Unsloth's use_gradient_checkpointing: True, False or "unsloth" (its offloaded checkpointing)."""
    if value == "unsloth":
        log_once("use_gradient_checkpointing='unsloth': fastload's non-reentrant checkpointing, through its engine's "
                 "offloaded checkpoints where the engine can use them")
        return True
    if isinstance(value, bool):
        return value
    raise InvalidOption(f"use_gradient_checkpointing={value!r}", found="Unsloth accepts True, False or 'unsloth'",
                        fix="pass use_gradient_checkpointing=True (or 'unsloth') or False")


def split_load_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(fastload from_pretrained arguments translated from Unsloth's names, the options left untouched)."""
    rest = dict(options)
    translated: dict[str, Any] = {}
    if "use_gradient_checkpointing" in rest:
        translated["gradient_checkpointing"] = checkpointing_flag(rest.pop("use_gradient_checkpointing"))
    if rest.pop("full_finetuning", False):
        raise InvalidOption("full_finetuning=True", found="fastload trains LoRA adapters (QLoRA), not every weight",
                            fix="leave full_finetuning=False and train LoRA adapters (get_peft_model)")
    if rest.pop("load_in_16bit", False):
        translated["load_in_4bit"] = False
    for name in sorted(set(rest) & set(IGNORED_LOAD_OPTIONS)):
        value = rest.pop(name)
        log_once("Unsloth option %s=%r accepted and not used: %s", name, value, IGNORED_LOAD_OPTIONS[name])
    return translated, rest


def split_peft_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(LoRA settings for fastload, what else was asked: gradient_checkpointing, max_seq_length) from Unsloth's
    get_peft_model keywords; every other key is a peft.LoraConfig field and goes into the LoRA settings."""
    lora = dict(options)
    extra: dict[str, Any] = {}
    if "use_gradient_checkpointing" in lora:
        extra["gradient_checkpointing"] = checkpointing_flag(lora.pop("use_gradient_checkpointing"))
    if lora.get("max_seq_length") is not None:
        extra["max_seq_length"] = lora.pop("max_seq_length")
    lora.pop("max_seq_length", None)
    if not lora.get("use_rslora", True):
        lora.pop("use_rslora")  # peft's default: left out so the settings compare equal to the defaults
    loftq = lora.pop("loftq_config", None)
    if loftq:
        raise InvalidOption("loftq_config was given", found="LoftQ initialises LoRA from the 16-bit weights, which a "
                            "4-bit model loaded by fastload no longer has in memory", fix="pass loftq_config=None")
    attention, mlp = lora.pop("finetune_attention_modules", True), lora.pop("finetune_mlp_modules", True)
    if not (attention and mlp) and lora.get("target_modules") is None:
        extra["target_groups"] = {"attention": bool(attention), "mlp": bool(mlp)}
    for name in sorted(set(lora) & set(IGNORED_PEFT_OPTIONS)):
        value = lora.pop(name)
        log_once("Unsloth option %s=%r accepted and not used: %s", name, value, IGNORED_PEFT_OPTIONS[name])
    return lora, extra
