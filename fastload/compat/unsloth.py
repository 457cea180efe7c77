"""Unsloth's public names on fastload: an Unsloth notebook runs by changing `unsloth` to `fastload` in its imports.

`FastLanguageModel.from_pretrained` returns the model without adapters, as Unsloth does, and `get_peft_model` adds
them through fastload's LoRA, gradient checkpointing and engine. Everything else (training, saving, generation) is
fastload's own; where an Unsloth option means nothing here it is accepted and logged once.
"""

from __future__ import annotations

import os
from typing import Any

from fastload.compat.trl_install import install_trl_compat
from fastload.facade import FastModel


class FastLanguageModel(FastModel):
    """Unsloth's FastLanguageModel: from_pretrained without adapters, then get_peft_model (FastModel's)."""

    @classmethod
    def from_pretrained(cls, model_name: str | os.PathLike = "unsloth/Llama-3.2-1B-Instruct",
                        max_seq_length: int | None = 2048, dtype: Any = None, load_in_4bit: bool | None = True,
                        token: str | bool | None = None, **options: Any):
        """Load for LoRA training without adapters (add them with get_peft_model).

        Args:
            model_name: hub id, registry alias, local folder, adapter folder or .gguf file. An adapter folder
                comes back with its adapter, trainable.
            max_seq_length: longest training sequence (Unsloth's default 2048).
            dtype: compute dtype, None for the device's.
            load_in_4bit: NF4 via bitsandbytes (default), False for 16-bit weights.
            token: Hugging Face token for gated repos (never logged).
            options: any FastModel.from_pretrained option, and Unsloth's (use_gradient_checkpointing,
                full_finetuning, load_in_8bit, load_in_16bit, fast_inference...; those with no meaning here are
                logged once).

        Returns:
            (model, tokenizer), the model carrying save_pretrained_merged / save_pretrained_gguf / push_to_hub_*.

        Raises:
            fastload.errors.FastloadError subclasses, as FastModel.from_pretrained.
        """
        options.setdefault("lora", None)
        install_trl_compat()
        return FastModel.from_pretrained(model_name, max_seq_length=max_seq_length, dtype=dtype,
                                         load_in_4bit=load_in_4bit, token=token, **options)


def is_bfloat16_supported() -> bool:
    """Whether the device fastload trains on computes bf16 natively (a GPU of capability >= 8.0, or a CPU with
    AVX512-BF16/AMX): what SFTConfig(bf16=...) should say."""
    import torch

    from fastload.load.devices import choose_compute_dtype

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return choose_compute_dtype(device) == torch.bfloat16
