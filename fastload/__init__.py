"""fastload: one line from a model name to a model ready for QLoRA fine-tuning.

`import fastload` is light: torch, transformers, bitsandbytes, peft and the optional backends are imported only by
the functions that use them.
"""

from __future__ import annotations

from typing import Any

from . import errors
from ._log import set_verbosity

__version__ = "0.1.0"

_LAZY = {
    "FastModel": ("facade", "FastModel"),
    "resolve": ("sources", "resolve"),
    "LoadPlan": ("plan", "LoadPlan"),
    "Store": ("store", "Store"),
    "register": ("registry", "register"),
    "get_registry": ("registry", "get_registry"),
    "estimate": ("memory", "estimate"),
    "QuantSettings": ("settings", "QuantSettings"),
    "LoraSettings": ("settings", "LoraSettings"),
    # Unsloth's names (fastload.compat.unsloth): a notebook changes only its imports
    "FastLanguageModel": ("compat.unsloth", "FastLanguageModel"),
    "is_bfloat16_supported": ("compat.unsloth", "is_bfloat16_supported"),
}

_SUBMODULES = {"registry", "store", "memory", "data", "saving", "cli", "settings", "plan", "devices", "lora", "chat_templates"}

__all__ = ["errors", "set_verbosity", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fastload' has no attribute {name!r}")
