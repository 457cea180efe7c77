"""Supervised fine-tuning: fastload.train.trainer.get_trainer as a method-table builder.

`sft=False` (the default, as before) builds transformers' Trainer over responses-only tokenized records;
`sft=True` builds TRL's SFTTrainer.
"""

from __future__ import annotations

from typing import Any


def build(model, tokenizer, data, args=None, sft: bool = False, **kwargs: Any):
    """See fastload.train.trainer.get_trainer (this is it, unchanged)."""
    from fastload.train.trainer import get_trainer

    return get_trainer(model, tokenizer, data, args=args, sft=sft, **kwargs)
