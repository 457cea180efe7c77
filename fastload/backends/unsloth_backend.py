"""The Unsloth backend: fastload's registry and defaults, Unsloth's engine. Imported only by a load that chose it,
because importing unsloth patches transformers, peft and trl for the whole process."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from fastload._log import logger
from fastload.model_state import state_of
from fastload.settings import DEFAULT_MAX_SEQ_LENGTH, DEFAULT_SEED, QuantSettings
from fastload.sources import plan as P

# model_type values Unsloth's FastLanguageModel has its own fast path for (unsloth/models/loader.py dispatch)
UNSLOTH_FAMILIES = ("llama", "mistral", "gemma", "gemma2", "qwen2", "qwen3")
MIN_UNSLOTH_VERSION = (2025, 1)


@dataclass(frozen=True)
class Unavailable:
    found: str
    fix: str


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def plan_model_type(plan) -> str | None:
    if plan.config:
        return plan.config.get("model_type")
    local = Path(plan.location)
    if not local.is_dir():
        from fastload.sources.hub import cached_snapshot, hub_cache_dir

        local = cached_snapshot(plan.location, plan.revision, hub_cache_dir(None)) or local
    try:
        return json.loads((local / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError):
        return None


def unsloth_unavailable_reason(plan, opts) -> Unavailable | None:
    """None when Unsloth can run this load; otherwise what stands in the way and the fix."""
    if importlib.util.find_spec("unsloth") is None:
        return Unavailable("unsloth is not installed", "pip install 'fastload[unsloth]', or use backend='native'")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("unsloth")
    except PackageNotFoundError:
        found = "0"
    if _version_tuple(found) < MIN_UNSLOTH_VERSION:
        return Unavailable(f"unsloth {found} is older than {'.'.join(map(str, MIN_UNSLOTH_VERSION))}",
                           "pip install -U unsloth unsloth_zoo, or use backend='native'")
    import torch

    if not torch.cuda.is_available():
        return Unavailable("Unsloth needs a CUDA GPU and torch sees none", "use backend='native' (runs on the CPU)")
    if opts.device_map in ("cpu", {"": "cpu"}):
        return Unavailable("device_map='cpu' was asked and Unsloth runs on the GPU only", "use backend='native'")
    model_type = plan_model_type(plan)
    if model_type not in UNSLOTH_FAMILIES:
        families = ", ".join(UNSLOTH_FAMILIES)
        return Unavailable(f"model family {model_type!r} has no Unsloth fast path (it has: {families})",
                           "use backend='native'")
    default = QuantSettings()
    q = plan.quant
    if q.load_in_4bit and (q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant, q.bnb_4bit_quant_storage) != (
            default.bnb_4bit_quant_type, default.bnb_4bit_use_double_quant, default.bnb_4bit_quant_storage):
        return Unavailable(f"Unsloth quantizes with nf4 + double quant only, {q.describe()} was asked",
                           "use the default quantization settings, or backend='native'")
    if plan.gguf_file:
        return Unavailable("Unsloth reads safetensors checkpoints, not GGUF", "use backend='native'")
    if plan.adapter:
        return Unavailable(f"{plan.adapter} is a saved LoRA adapter, which the Unsloth backend would replace with a "
                           "fresh one", "use backend='native' to train on or generate with a saved adapter")
    return None


def import_failure() -> Unavailable | None:
    """Import unsloth (only once it has been chosen: the import patches transformers, peft and trl)."""
    try:
        import unsloth  # noqa: F401
    except Exception as e:  # a version mismatch with torch/transformers surfaces as any exception at import
        return Unavailable(f"unsloth is installed but does not import ({type(e).__name__}: {e})",
                           "pip install -U unsloth unsloth_zoo to match this torch and transformers, "
                           "or use backend='native'")
    return None


@contextlib.contextmanager
def quiet_offline_env(offline: bool):
    """No telemetry ever; no hub traffic unless this plan downloads. Restores the environment afterwards."""
    wanted = {"UNSLOTH_DISABLE_STATISTICS": "1"}
    if offline:
        wanted["HF_HUB_OFFLINE"] = "1"
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class UnslothBackend:
    name = "unsloth"

    def load(self, plan, opts, store, lora, gradient_checkpointing, random_state):
        from fastload.load.loader import choose_dtype, load_tokenizer
        from fastload.sources.hub import cached_snapshot, hub_cache_dir

        location = plan.location
        if plan.source == P.HUB_CACHE:
            location = str(cached_snapshot(plan.location, plan.revision, hub_cache_dir(opts.cache_dir)))
        offline = plan.source != P.HUB_DOWNLOAD
        dtype = choose_dtype(plan, opts, "cuda")
        with quiet_offline_env(offline):
            from unsloth import FastLanguageModel

            q = plan.quant
            model, tokenizer = FastLanguageModel.from_pretrained(
                model_name=location, max_seq_length=opts.max_seq_length or DEFAULT_MAX_SEQ_LENGTH, dtype=dtype,
                load_in_4bit=q.load_in_4bit or plan.prequantized and q.bits == 16, load_in_8bit=q.load_in_8bit,
                load_in_16bit=not q.quantized and not plan.prequantized, token=opts.token,
                trust_remote_code=opts.trust_remote_code, rope_scaling=opts.rope_scaling,
                revision=plan.revision if plan.source == P.HUB_DOWNLOAD else None, use_exact_model_name=True,
                random_state=random_state if random_state is not None else DEFAULT_SEED,
                use_gradient_checkpointing="unsloth" if gradient_checkpointing else False)
            if lora is not None:
                from fastload.train.lora import find_lora_targets

                targets = lora.target_modules if isinstance(lora.target_modules, str) else (
                    list(lora.target_modules) if lora.target_modules else find_lora_targets(model))
                model = FastLanguageModel.get_peft_model(
                    model, r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout, bias=lora.bias,
                    target_modules=targets, random_state=random_state if random_state is not None else DEFAULT_SEED,
                    use_gradient_checkpointing="unsloth" if gradient_checkpointing in (True, "unsloth") else False,
                    **lora.extra)
        if store is not None and plan.store_key and not plan.prequantized:
            logger.info("backend unsloth: the quantized model is not written to the store (Unsloth quantizes itself)")
        if tokenizer.pad_token is None or getattr(tokenizer, "padding_side", "right") != "right":
            fixed = load_tokenizer(plan, opts) if tokenizer.pad_token is None else tokenizer
            fixed.padding_side = "right"
            tokenizer = fixed
        model.max_seq_length = opts.max_seq_length or DEFAULT_MAX_SEQ_LENGTH
        state_of(model).quantized_now = not plan.prequantized and plan.quant.quantized
        return model, tokenizer
