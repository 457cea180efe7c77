"""Which attention implementation a model gets: the best its architecture supports on this device, or the user's.

transformers' own rule for an unset choice is sdpa where the class supports it, eager otherwise; fastload adds
flash-attention where it is installed and the class and device support it. An explicit choice is checked before
any weight is read, so an impossible one fails with the list of those that can run.
"""

from __future__ import annotations

import importlib.util

from fastload._log import logger
from fastload.errors import InvalidOption, UnsupportedArchitecture

AUTO = ("auto", None)
HALF_DTYPES = ("float16", "bfloat16")


def model_class(config):
    """The transformers class AutoModelForCausalLM builds for this config, or None when it has none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None


def runnable_implementations(config, device: str, dtype) -> list[str]:
    """The attention implementations this model can run on `device` in `dtype`, best first.

    Args:
        config: the model's transformers config.
        device: "cpu", "cuda", "mps", ...
        dtype: the compute dtype (torch.dtype).

    Returns:
        Names accepted by `attn_implementation`, "eager" always last.
    """
    cls = model_class(config)
    if cls is None:
        return ["eager"]
    half = str(dtype).replace("torch.", "") in HALF_DTYPES
    names = []
    if device == "cuda" and half and getattr(cls, "_supports_flash_attn", False) and _installed("flash_attn"):
        names.append("flash_attention_2")
    if getattr(cls, "_supports_sdpa", False):
        names.append("sdpa")
    if device == "cuda" and _installed("xformers") and getattr(cls, "_supports_attention_backend", False):
        names.append("xformers")
    if getattr(cls, "_supports_flex_attn", False):
        names.append("flex_attention")
    return names + ["eager"]


def choose_attn_implementation(config, device: str, dtype, asked: str | None) -> str:
    """The implementation to load with: the best runnable one when `asked` is None/"auto", else `asked` if it runs.

    Args:
        config: the model's transformers config.
        device: the main device of the load.
        dtype: the compute dtype.
        asked: the user's `attn_implementation` (None or "auto": choose).

    Returns:
        The name to pass to transformers.

    Raises:
        InvalidOption: `asked` names an implementation this model cannot run here; the message lists those that can.
    """
    runnable = runnable_implementations(config, device, dtype)
    cls = model_class(config)
    if cls is None and not getattr(config, "auto_map", None):
        kind, fix = _not_causal_lm(config)
        raise UnsupportedArchitecture(f"Loading a model of model_type {config.model_type!r}",
                                      found=f"transformers {_version()} has no causal language model for "
                                            f"{type(config).__name__} ({kind})", fix=fix)
    if cls is not None and getattr(config, "is_encoder_decoder", False) and not getattr(config, "auto_map", None):
        # BART, mBART, Pegasus, Marian...: their causal LM is the decoder alone, which would drop the encoder's weights
        # (a saved decoder-only variant says is_encoder_decoder=False and loads)
        raise UnsupportedArchitecture(f"Loading a model of model_type {config.model_type!r}",
                                      found=f"this checkpoint is {ENCODER_DECODER}; transformers' {cls.__name__} is "
                                            "its decoder alone, without the encoder", fix=ENCODER_DECODER_FIX)
    arch = cls.__name__ if cls is not None else type(config).__name__
    if asked in AUTO:
        best = next(name for name in runnable if name in AUTO_CHOICES)
        logger.info("attention: %s (the best %s supports on %s; runnable here: %s)", best, arch, device,
                    ", ".join(runnable))
        return best
    if asked in runnable or asked not in KNOWN:
        return asked  # names fastload does not know (hub kernels, registered functions) are transformers' to check
    raise InvalidOption(f"attn_implementation={asked!r}",
                        found=f"{arch} cannot run {asked!r} on {device} in {str(dtype).replace('torch.', '')}; "
                              f"it can run: {', '.join(runnable)}",
                        fix=f"leave attn_implementation unset (fastload picks the best of them) or pass one of "
                            f"{', '.join(repr(n) for n in runnable)}")


def _not_causal_lm(config) -> tuple[str, str]:
    """What kind of model a config without a causal LM describes, and what the user can do instead."""
    if getattr(config, "is_encoder_decoder", False):
        return f"{ENCODER_DECODER}: fastload fine-tunes decoder-only causal language models", ENCODER_DECODER_FIX
    if getattr(config, "vision_config", None) is not None:
        return ("an image-text model with no causal language model in transformers: fastload fine-tunes the text "
                "part of those that have one (Gemma-3, Gemma-4, Qwen3.5)",
                "pick the text-only sibling of this checkpoint if it has one (e.g. a -Instruct text model), or "
                "fine-tune it with peft and transformers' image-text classes")
    return ("it is not a text generator, or is newer than this transformers",
            "pick a text-generation checkpoint, or upgrade transformers")


ENCODER_DECODER = "an encoder-decoder model"
ENCODER_DECODER_FIX = ("pick a decoder-only checkpoint (Llama, Qwen, Mistral, ...); encoder-decoder models train with "
                       "peft and transformers' Seq2SeqTrainer")
KNOWN = ("eager", "sdpa", "flash_attention_2", "flex_attention", "xformers")
# chosen automatically, best first; xformers and flex stay explicit: neither handles every family's softcap or sinks
AUTO_CHOICES = ("flash_attention_2", "sdpa", "eager")


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _version() -> str:
    import transformers

    return transformers.__version__
