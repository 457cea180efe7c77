"""Trained -> saved: the adapter alone (adapters), or merged into a 16-bit or re-quantized checkpoint (merged); every
save writes its folder whole or not at all (folders). 4-bit checkpoints for `fastload quantize` live in quantized.

This package imports none of them itself: the public names below are loaded on first use (PEP 562)."""

from __future__ import annotations

from fastload._lazy import lazy_getattr

# public names, each imported from its module on first use
_LAZY = {**dict.fromkeys(("load_adapter", "save_adapter", "save_adapter_into"), "fastload.save.adapters"),
         "save_merged": "fastload.save.merged"}
__all__ = list(_LAZY)
__getattr__ = lazy_getattr("fastload.save", _LAZY)
