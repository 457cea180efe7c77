"""What llama.cpp expects of each model family: its GGUF architecture, the tensors it stores differently from
transformers, and the hyperparameters it reads. A family not listed here is refused before any work is done."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fastload.errors import UnsupportedArchitecture


@dataclass(frozen=True)
class Family:
    """One transformers model type as llama.cpp stores it."""

    arch: str
    """The GGUF architecture name (`general.architecture`), e.g. "llama"."""
    permute_qk: bool = False
    """llama.cpp's llama graph applies rotary embeddings to interleaved pairs; HF's to the two halves of each head."""
    norm_plus_one: bool = False
    """Gemma norms scale by (1 + weight) in transformers; llama.cpp multiplies by the weight as stored."""
    drop_lm_head: bool = False
    """Gemma always ties the output to the embedding; llama.cpp reads token_embd for both."""
    softcapping: bool = False
    sliding_window: bool = False


FAMILIES = {
    "llama": Family("llama", permute_qk=True),
    "mistral": Family("llama", permute_qk=True),
    "qwen2": Family("qwen2"),
    "qwen3": Family("qwen3"),
    "gemma": Family("gemma", norm_plus_one=True, drop_lm_head=True),
    "gemma2": Family("gemma2", norm_plus_one=True, drop_lm_head=True, softcapping=True, sliding_window=True),
    "gemma3_text": Family("gemma3", norm_plus_one=True, drop_lm_head=True, sliding_window=True),
    "phi3": Family("phi3"),
}
ROPE_TYPES = {None, "default", "linear", "llama3"}


def rope_parameters(config: dict) -> dict:
    """transformers 5 keeps rope settings in `rope_parameters`; older configs in `rope_theta` and `rope_scaling`."""
    params = dict(config.get("rope_scaling") or {})
    nested = config.get("rope_parameters") or {}
    # Gemma-3 keeps one set per attention kind; llama.cpp reads the full-attention one (sliding layers: base 10000)
    params.update(nested.get("full_attention", nested) if isinstance(nested.get("full_attention"), dict) else nested)
    if "rope_theta" in config and "rope_theta" not in params:
        params["rope_theta"] = config["rope_theta"]
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    return params


def family_for(config: dict) -> Family:
    """The family of a config.json, or UnsupportedArchitecture saying which families can be written."""
    model_type = config.get("model_type")
    if model_type == "gemma3" and "text_config" in config:
        raise UnsupportedArchitecture("Writing a GGUF of a Gemma-3 vision model", found="model_type gemma3 with a "
                                      "vision tower", fix="export the text-only model (Gemma3ForCausalLM)")
    family = FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedArchitecture(f"Writing a GGUF of a {model_type!r} model",
                                      found=f"families fastload writes: {', '.join(sorted(FAMILIES))}",
                                      fix="export the merged 16-bit folder and convert it with llama.cpp's "
                                          "convert_hf_to_gguf.py")
    rope_type = rope_parameters(config).get("rope_type")
    if rope_type not in ROPE_TYPES:
        raise UnsupportedArchitecture(f"Writing a GGUF of a {model_type!r} model",
                                      found=f"rope scaling {rope_type!r}; fastload writes: default, linear, llama3",
                                      fix="convert the merged 16-bit folder with llama.cpp's convert_hf_to_gguf.py")
    return family


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def add_hyperparameters(writer, family: Family, config: dict) -> None:
    """The `<arch>.*` keys llama.cpp reads to build the graph."""
    rope = rope_parameters(config)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(config["vocab_size"])
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(int(head_dim(config) * config.get("partial_rotary_factor", 1.0)))
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if rope.get("rope_type") == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if family.softcapping:
        if config.get("attn_logit_softcapping") is not None:
            writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        if config.get("final_logit_softcapping") is not None:
            writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    if family.sliding_window and config.get("sliding_window"):
        writer.add_sliding_window(config["sliding_window"])
    if family.arch == "phi3" and config.get("original_max_position_embeddings"):
        writer.add_rope_scaling_orig_ctx_len(config["original_max_position_embeddings"])


def llama3_rope_factors(config: dict) -> np.ndarray | None:
    """llama.cpp reads Llama-3.1's frequency-dependent rope scaling as a `rope_freqs` tensor of per-pair divisors."""
    rope = rope_parameters(config)
    if rope.get("rope_type") != "llama3":
        return None
    dim = head_dim(config)
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor, low, high = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def permute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split rotary layout of q/k rows -> llama.cpp's interleaved pairs, per head (biases too)."""
    shape = weight.shape
    return weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def transform(family: Family, config: dict, key: str, array: np.ndarray) -> np.ndarray:
    """A checkpoint tensor as llama.cpp stores it (same shape)."""
    if family.permute_qk and key.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return permute_rotary(array, config["num_attention_heads"])
    if family.permute_qk and key.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return permute_rotary(array, config.get("num_key_value_heads") or config["num_attention_heads"])
    if family.norm_plus_one and key.endswith("norm.weight"):
        return array + 1
    return array


def skipped(family: Family, config: dict, key: str) -> bool:
    """Checkpoint tensors llama.cpp has no use for: rotary caches, a tied output it reads from the embedding."""
    if key.endswith("rotary_emb.inv_freq"):
        return True
    return key == "lm_head.weight" and (family.drop_lm_head or _tied(config))


def _tied(config: dict) -> bool:
    return bool(config.get("tie_word_embeddings", False))

