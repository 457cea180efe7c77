"""fastload: one line from a model name to a model ready for QLoRA fine-tuning.

`import fastload` is light: torch, transformers, bitsandbytes, peft and the optional backends are imported only by
the functions that use them.
"""

from __future__ import annotations

from typing import Any

from fastload import errors
from fastload._log import set_verbosity

__version__ = "0.1.0"

_LAZY = {
    "FastModel": ("fastload.facade", "FastModel"),
    "resolve": ("fastload.sources.resolve", "resolve"),
    "LoadPlan": ("fastload.sources.plan", "LoadPlan"),
    "Store": ("fastload.sources.store", "Store"),
    "register": ("fastload.sources.registry", "register"),
    "get_registry": ("fastload.sources.registry", "get_registry"),
    "estimate": ("fastload.load.memory", "estimate"),
    "QuantSettings": ("fastload.settings", "QuantSettings"),
    "LoraSettings": ("fastload.settings", "LoraSettings"),
    # Unsloth's names (fastload.compat.unsloth): a notebook changes only its imports
    "FastLanguageModel": ("fastload.compat.unsloth", "FastLanguageModel"),
    "is_bfloat16_supported": ("fastload.compat.unsloth", "is_bfloat16_supported"),
}

# `fastload.<name>` attribute access for modules, including those that moved into subpackages
_SUBMODULES = {
    "registry": "fastload.sources.registry",
    "data": "fastload.data",
    "settings": "fastload.settings",
    "cli": "fastload.cli",
    "sources": "fastload.sources",
    "load": "fastload.load",
    "train": "fastload.train",
    "save": "fastload.save",
    "engine": "fastload.engine",
    "store": "fastload.sources.store",
    "plan": "fastload.sources.plan",
    "memory": "fastload.load.memory",
    "devices": "fastload.load.devices",
    "lora": "fastload.train.lora",
    "saving": "fastload.save",  # the flat layout's saving module: its public functions
    "chat_templates": "fastload.chat_templates",
}

__all__ = ["errors", "set_verbosity", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(_SUBMODULES[name])
    raise AttributeError(f"module 'fastload' has no attribute {name!r}")
