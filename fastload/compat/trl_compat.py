"""TRL's SFTTrainer and SFTConfig as Unsloth notebooks call them, for the Unsloth compatibility surface.

Unsloth notebooks pass `tokenizer=`, `dataset_text_field=`, `max_seq_length=` and `packing=` to SFTTrainer (names
TRL has since moved or renamed), and build SFTConfig without a precision, which TRL then sets to bf16 even where the
device has none. Importing Unsloth makes trl accept them; so does using fastload's Unsloth surface
(FastLanguageModel, fastload.chat_templates, FastModel given Unsloth's keyword names such as full_finetuning):
`trl.SFTTrainer` and `trl.SFTConfig` become the subclasses below,
which translate those names, choose the device's precision when none was asked, and give a fastload model
fastload's AdamW8bit and checkpointing guard. TRL's own classes are not modified.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import trl

from fastload._log import logger
from fastload.compat.options import log_once
from fastload.model_state import state_of
from fastload.train.trainer import adopt_checkpointing_names, loader_flags

TrlSFTTrainer, TrlSFTConfig = trl.SFTTrainer, trl.SFTConfig
# SFTTrainer keywords of older TRL (and of Unsloth's patched trainer) that are SFTConfig fields now: old -> new name
MOVED_TO_CONFIG = {"dataset_text_field": "dataset_text_field", "max_seq_length": "max_length", "packing": "packing",
                   "dataset_num_proc": "dataset_num_proc", "dataset_kwargs": "dataset_kwargs",
                   "eval_packing": "eval_packing"}


@dataclasses.dataclass
class SFTConfig(TrlSFTConfig):
    """trl.SFTConfig that also takes max_seq_length (now max_length) and, when no precision is given, trains in
    the precision the device computes (fp32 on a CPU without native bf16) instead of TRL's bf16."""

    max_seq_length: int | None = None

    def __post_init__(self):
        if self.max_seq_length is not None:
            self.max_length = self.max_seq_length
        self._choose_precision()
        self.dataloader_pin_memory = loader_flags().get("dataloader_pin_memory", self.dataloader_pin_memory)
        adopt_checkpointing_names(self)
        super().__post_init__()

    def _choose_precision(self) -> None:
        import torch

        from fastload.train.trainer import precision_flags

        on_gpu = torch.cuda.is_available()
        if self.fp16 and not on_gpu:
            log_once("SFTConfig(fp16=True) on a machine without a GPU: fp16 mixed precision needs one; training "
                     "in the CPU's own precision")
            self.fp16, self.bf16 = False, None
        if self.bf16 is None and not self.fp16:
            flags = precision_flags(None)
            self.bf16, self.use_cpu = flags["bf16"], self.use_cpu or flags.get("use_cpu", False)
            self.fp16 = self.fp16 or flags["fp16"]
        elif self.bf16 and not on_gpu:
            self.use_cpu = True  # transformers refuses bf16 without a GPU unless told to run on the CPU


class SFTTrainer(TrlSFTTrainer):
    """trl.SFTTrainer that accepts Unsloth's keyword names and gives a fastload model fastload's training parts."""

    EXTRA_KEYWORDS = tuple(MOVED_TO_CONFIG)  # taken through **kwargs: get_trainer's check of keywords reads them

    def __init__(self, model=None, args=None, *more: Any, tokenizer=None, **kwargs: Any):
        if tokenizer is not None and kwargs.get("processing_class") is None:
            kwargs["processing_class"] = tokenizer
        moved = {MOVED_TO_CONFIG[k]: kwargs.pop(k) for k in list(kwargs) if k in MOVED_TO_CONFIG}
        if args is None:
            args = SFTConfig(output_dir="outputs", report_to="none")
        for name, value in moved.items():
            if value is not None:
                setattr(args, name, value)
        if moved:
            log_once("SFTTrainer(%s): passed on to its SFTConfig", ", ".join(f"{k}=" for k in sorted(moved)))
        dtypes = None
        if state_of(model, create=False).plan is not None:
            from fastload.train.trainer import add_fastload_parts, sft_args_for

            args = sft_args_for(model, args)
            kwargs = add_fastload_parts(model, args, kwargs)
            dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
        super().__init__(model, args, *more, **kwargs)
        if dtypes:
            from fastload.train.trainer import restore_adapter_dtypes

            restore_adapter_dtypes(model, dtypes)


def install() -> None:
    """Make `from trl import SFTTrainer, SFTConfig` return the classes above (once, logged)."""
    if trl.SFTTrainer is SFTTrainer:
        return
    trl.SFTTrainer, trl.SFTConfig = SFTTrainer, SFTConfig
    logger.info("Unsloth compatibility: trl.SFTTrainer / trl.SFTConfig accept Unsloth's keywords (tokenizer=, "
                "dataset_text_field=, max_seq_length=, packing=) and the device's precision "
                "(fastload.compat.trl_compat)")
