"""Trained -> saved: the adapter alone (adapters), or merged into a 16-bit or re-quantized checkpoint (merged); every
save writes its folder whole or not at all (folders). 4-bit checkpoints for `fastload quantize` live in quantized.

This package imports none of them itself: the public names below are loaded on first use (PEP 562)."""

from __future__ import annotations

from typing import Any

_LAZY = {
    "load_adapter": "fastload.save.adapters",
    "save_adapter": "fastload.save.adapters",
    "save_adapter_into": "fastload.save.adapters",
    "save_merged": "fastload.save.merged",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastload.save' has no attribute {name!r}")
