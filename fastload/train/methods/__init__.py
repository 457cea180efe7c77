"""Training methods as a table: a method name -> the builder that returns its trainer with fastload's defaults.

The contract every builder keeps (one module per method family, registered below by module path):

    build(model, tokenizer, data, args=None, **kwargs) -> trainer

- model, tokenizer: what FastModel.from_pretrained returned (a peft model with LoRA on a 4-bit base).
- data: the method's records (a list of dicts or a datasets.Dataset); the builder checks their shape and raises
  fastload.errors.InvalidOption naming the missing field and the shapes it accepts.
- args: None for fastload's defaults, or the method's own arguments class (TrainingArguments or a TRL config);
  keyword arguments that are fields of that class override it, the others go to the trainer's constructor.
- returns a transformers Trainer (or TRL subclass) built with fastload's AdamW8bit where the optimizer is left to
  the defaults, the checkpointing guard (fastload.train.trainer.add_fastload_parts), bf16 where the model computes
  in it and max_length from model.max_seq_length where the method truncates.

Builders are imported only when their method is asked for: `import fastload` stays light, and a method whose module
is not installed fails with a fastload error instead of an ImportError at import time.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from fastload.errors import InvalidOption

# method -> "module:function". The order is the order users read in errors and --help.
METHODS: dict[str, str] = {
    "sft": "fastload.train.methods.sft:build",
    "dpo": "fastload.train.methods.preference:build_dpo",
    "orpo": "fastload.train.methods.preference:build_orpo",
    "kto": "fastload.train.methods.preference:build_kto",
    "simpo": "fastload.train.methods.preference:build_simpo",
    "grpo": "fastload.train.methods.grpo:build",
    "pretrain": "fastload.train.methods.pretrain:build",
    "classify": "fastload.train.methods.classify:build",
}


def method_names() -> list[str]:
    """Every method name get_trainer and `fastload train --method` accept."""
    return list(METHODS)


def builder_for(method: str) -> Callable[..., Any]:
    """The build function of `method`, imported now.

    Raises:
        InvalidOption: an unknown method (the accepted ones named), or one whose module is not part of this install.
    """
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise InvalidOption(f"method={method!r}", found=f"the training methods are: {', '.join(METHODS)}",
                            fix="pick one of them (sft is supervised fine-tuning, the default)")
    module_name, _, function = METHODS[method.lower()].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:  # a dependency of the module is missing: its own error says which
            raise
        raise InvalidOption(f"method={method!r}", found=f"this fastload has no {module_name} (the method is not "
                            "part of this version)", fix=f"update fastload, or use one of: "
                            f"{', '.join(m for m in METHODS if m != method.lower())}") from e
    return getattr(module, function)


def build_trainer(method: str, model, tokenizer, data, args=None, **kwargs: Any):
    """The trainer for `method` (see the module docstring for what every builder returns)."""
    return builder_for(method)(model, tokenizer, data, args=args, **kwargs)
