"""Trained -> saved: the adapter alone (adapters), or merged into a 16-bit or re-quantized checkpoint (merged); every
save writes its folder whole or not at all (folders). 4-bit checkpoints for `fastload quantize` live in quantized."""

from fastload.save.adapters import load_adapter, save_adapter, save_adapter_into
from fastload.save.merged import save_merged

__all__ = ["load_adapter", "save_adapter", "save_adapter_into", "save_merged"]
