"""Exits for a trained model: one GGUF file for llama.cpp / Ollama (fastload.export.gguf), with what a merge cost
measured (fastload.export.verify). Nothing heavy is imported until a function is called."""

from __future__ import annotations

from typing import Any


def save_gguf(model_or_folder: Any, path, tokenizer=None, quantization: str = "q8_0", **options: Any):
    """One GGUF file for llama.cpp / Ollama: fastload.export.gguf.save_gguf, imported on first call.

    Args:
        model_or_folder: a fastload model with LoRA adapters, or a folder of a merged 16-bit checkpoint.
        path: the .gguf file to write.
        tokenizer: the tokenizer trained with.
        quantization: "f16", "bf16", "q8_0" or a llama.cpp k-quant such as "q4_k_m".
        **options: source, modelfile, verify, probe_texts.

    Returns:
        The path of the written .gguf file.

    Raises:
        UnsupportedArchitecture, InvalidOption, BackendUnavailable, AdapterError, SaveError: as save_gguf says.
    """
    from fastload.export.gguf import save_gguf as _save_gguf

    return _save_gguf(model_or_folder, path, tokenizer=tokenizer, quantization=quantization, **options)


__all__ = ["save_gguf"]
