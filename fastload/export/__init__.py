"""Exits for a trained model: one GGUF file for llama.cpp / Ollama (fastload.export.gguf), with what a merge cost
measured (fastload.export.verify). Nothing heavy is imported until a function is called."""

from __future__ import annotations

from typing import Any


def save_gguf(model_or_folder: Any, path, tokenizer=None, quantization: str = "q8_0", **options: Any):
    """See fastload.export.gguf.save_gguf."""
    from fastload.export.gguf import save_gguf as _save_gguf

    return _save_gguf(model_or_folder, path, tokenizer=tokenizer, quantization=quantization, **options)


__all__ = ["save_gguf"]
