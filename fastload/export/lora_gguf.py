"""The LoRA adapter alone as a llama.cpp adapter file (`llama-cli -m base.gguf --lora adapter.gguf`), for users who
keep the base GGUF: megabytes instead of a whole model per fine-tune.

llama.cpp reads `<base tensor>.lora_a` (r x in) and `.lora_b` (out x r) and scales their product by
adapter.lora.alpha / r. peft's per-module scaling (alpha/r, rslora's alpha/sqrt(r), rank and alpha patterns) is
folded into lora_b where it differs from that, so the file computes exactly peft's delta.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fastload._log import logger
from fastload.errors import AdapterError
from fastload.export.families import family_for, permute_rotary


def save_lora_gguf(model, path: str | os.PathLike) -> Path:
    """Write the model's active LoRA adapter as a llama.cpp GGUF adapter file.

    Args:
        model: a fastload/peft model with LoRA adapters (plain LoRA: no DoRA, no trained embeddings or lm_head).
        path: the .gguf file to write (atomically: a temporary sibling renamed once complete).

    Returns:
        The path written.

    Raises:
        UnsupportedArchitecture: a family fastload cannot write.
        AdapterError: the adapter holds what llama.cpp's LoRA format cannot carry (DoRA, modules_to_save, ...).
    """
    import gguf

    from fastload.export.gguf import _atomic_file
    from fastload.save.merged import Deltas

    config = model.config.to_dict()
    family = family_for(config)
    deltas = Deltas(model)  # refuses DoRA and LoRA biases
    if deltas.replaced:
        raise AdapterError("Writing the LoRA adapter as a llama.cpp adapter file",
                           found=f"it also trains whole tensors ({sorted(deltas.replaced)[:2]}...)",
                           fix="export the merged model instead: save_gguf(model, path)")
    names = gguf.get_tensor_name_map(_arch(family.arch), config["num_hidden_layers"])
    pairs = [(names.get_name(key, try_suffixes=(".weight",)), key, module) for key, module in deltas.modules.items()]
    alpha = _common_alpha(deltas)
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), family.arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, key, module in sorted(pairs, key=lambda p: p[0] or ""):
            if name is None:
                raise AdapterError("Writing the LoRA adapter as a llama.cpp adapter file",
                                   found=f"{key} has no llama.cpp tensor name", fix="export the merged model instead")
            a, b = _lora_pair(module, deltas.adapter, alpha)
            b = _as_llama_cpp_rows(family, config, key, b)
            writer.add_tensor(f"{name}.lora_a", a)
            writer.add_tensor(f"{name}.lora_b", b)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    logger.info("wrote the LoRA adapter for llama.cpp --lora: %s (%d adapted tensors, alpha %g)", path, len(pairs),
                alpha)
    return path


def _arch(name: str):
    import gguf

    return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == name)


def _common_alpha(deltas) -> float:
    """The alpha that reproduces the first module's scaling; other modules' differences go into their lora_b."""
    module = next(iter(deltas.modules.values()))
    return float(module.scaling[deltas.adapter] * module.r[deltas.adapter])


def _lora_pair(module, adapter: str, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) in float32 with B rescaled so that alpha / r * B @ A equals peft's scaling * B @ A."""
    import torch

    a = module.lora_A[adapter].weight.detach().to("cpu", torch.float32).numpy()
    b = module.lora_B[adapter].weight.detach().to("cpu", torch.float32).numpy()
    rank = a.shape[0]
    factor = module.scaling[adapter] * rank / alpha
    if abs(factor - 1.0) > 1e-6:
        b = b * np.float32(factor)
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


def _as_llama_cpp_rows(family, config: dict, key: str, b: np.ndarray) -> np.ndarray:
    """q/k rows are stored in llama.cpp's rotary order in the base GGUF: B's output rows must follow them."""
    if family.permute_qk and key.endswith("self_attn.q_proj.weight"):
        return np.ascontiguousarray(permute_rotary(b, config["num_attention_heads"]))
    if family.permute_qk and key.endswith("self_attn.k_proj.weight"):
        return np.ascontiguousarray(permute_rotary(b, config.get("num_key_value_heads")
                                                   or config["num_attention_heads"]))
    return b
