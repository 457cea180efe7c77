"""Reads a LoadPlan into a transformers model and tokenizer: quantizing on the fly or loading as stored."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import plan as P
from ._log import logger
from .devices import check_dtype_supported, choose_compute_dtype, main_device, resolve_device_map
from .errors import (CheckpointCorrupt, CheckpointIncomplete, GatedModel, InvalidOption, ModelNotFound,
                     NotEnoughMemory, UnsafeCheckpoint, UnsupportedArchitecture)
from .plan import LoadPlan
from .settings import dtype_name


@dataclass
class LoadOptions:
    max_seq_length: int | None = None  # None: 2048, capped at the model's positions
    dtype: Any = None
    device_map: Any = None
    token: str | bool | None = None
    cache_dir: str | None = None
    local_files_only: bool | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = "sdpa"
    allow_pickle: bool = False
    rope_scaling: dict | None = None
    model_kwargs: dict = field(default_factory=dict)


def torch_dtype(name: str | None):
    import torch

    return getattr(torch, name) if name else None


def hub_kwargs(plan: LoadPlan, opts: LoadOptions) -> dict:
    local = plan.source in (P.LOCAL, P.STORE) or Path(plan.location).is_dir()
    kw: dict[str, Any] = {"trust_remote_code": opts.trust_remote_code}
    if not local:
        from .sources import hub_cache_dir

        kw.update(revision=plan.revision, cache_dir=hub_cache_dir(opts.cache_dir), token=opts.token,
                  local_files_only=plan.source != P.HUB_DOWNLOAD)
    return kw


@contextlib.contextmanager
def translated_errors(plan: LoadPlan):
    """Turn the errors of huggingface_hub, transformers and safetensors into fastload's, keeping the cause."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    where = f"Loading {plan.name!r} from {plan.location}"
    try:
        yield
    except GatedRepoError as e:
        raise GatedModel(where, found="the repository is gated: its terms must be accepted and a token given",
                         fix="accept the terms on the model's hub page, then pass token=... or run `hf auth login`; "
                             "or use a registry name with an ungated pre-quantized copy") from e
    except RepositoryNotFoundError as e:
        raise ModelNotFound(where, found="the hub has no such repository (or it is private)",
                            fix="check the repo id, or pass token=... for a private repo") from e
    except LocalEntryNotFoundError as e:
        raise ModelNotFound(where, found="not in the local cache and downloads are off (offline)",
                            fix="download it while online, or unset HF_HUB_OFFLINE / local_files_only") from e
    except (EnvironmentError, ValueError, RuntimeError, KeyError) as e:
        text = str(e)
        if "out of memory" in text.lower():
            raise NotEnoughMemory(where, found=text.splitlines()[0],
                                  fix="load in 4-bit, free memory, or use a smaller model") from e
        if "size mismatch" in text or "shape" in text.lower() and "mismatch" in text.lower():
            raise CheckpointIncomplete(where, found=f"weights do not match the config: {text.splitlines()[0][:300]}",
                                       fix="use the config.json that belongs to these weights") from e
        if "safetensors" in text.lower() or "header" in text.lower() or "deserializ" in text.lower():
            raise CheckpointCorrupt(where, found=f"the weight files cannot be read: {text.splitlines()[0][:300]}",
                                    fix="download or save the checkpoint again") from e
        if "does not recognize this architecture" in text or "Unrecognized configuration" in text or \
                "model type" in text.lower() and "not" in text.lower():
            raise UnsupportedArchitecture(where, found=text.splitlines()[0][:300],
                                          fix="upgrade transformers, or pass trust_remote_code=True if you trust the repo") from e
        if "use_safetensors" in text or "pytorch_model.bin" in text or ".bin" in text and "safetensors" in text:
            raise UnsafeCheckpoint(where, found="the checkpoint has no safetensors weights, only pickle files",
                                   fix="pass allow_pickle=True if you trust its origin") from e
        raise


def load_config(plan: LoadPlan, opts: LoadOptions):
    from transformers import AutoConfig

    with translated_errors(plan):
        return AutoConfig.from_pretrained(plan.location, **hub_kwargs(plan, opts))


DEFAULT_MAX_SEQ_LENGTH = 2048


def check_max_seq_length(config, max_seq_length: int | None, rope_scaling: dict | None) -> int:
    """The sequence length to train with: as asked, or (unset) 2048 capped at the model's positions."""
    positions = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                        "max_position_embeddings", None)
    if max_seq_length is None:
        return min(DEFAULT_MAX_SEQ_LENGTH, positions or DEFAULT_MAX_SEQ_LENGTH)
    if positions is None or max_seq_length <= positions:
        return max_seq_length
    if rope_scaling:
        logger.warning("max_seq_length=%s is beyond the model's %s positions; rope_scaling=%s extends them",
                       max_seq_length, positions, rope_scaling)
        return max_seq_length
    raise InvalidOption(f"max_seq_length={max_seq_length} was asked for",
                        found=f"the model was trained for {positions} positions (max_position_embeddings)",
                        fix=f"use max_seq_length<={positions}, or pass rope_scaling={{...}} to extend the context on purpose")


def choose_dtype(plan: LoadPlan, opts: LoadOptions, device: str):
    asked = dtype_name(opts.dtype, "dtype") or plan.quant.bnb_4bit_compute_dtype
    dtype = torch_dtype(asked) if asked else choose_compute_dtype(device)
    check_dtype_supported(dtype, device)
    return dtype


def bnb_config(plan: LoadPlan, compute_dtype):
    from transformers import BitsAndBytesConfig

    q = plan.quant
    return BitsAndBytesConfig(
        load_in_4bit=q.load_in_4bit, load_in_8bit=q.load_in_8bit, bnb_4bit_quant_type=q.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch_dtype(q.bnb_4bit_quant_storage), llm_int8_threshold=q.llm_int8_threshold,
        llm_int8_skip_modules=list(q.llm_int8_skip_modules) if q.llm_int8_skip_modules else None,
        llm_int8_enable_fp32_cpu_offload=q.llm_int8_enable_fp32_cpu_offload,
        llm_int8_has_fp16_weight=q.llm_int8_has_fp16_weight)


def set_compute_dtype(model, dtype) -> None:
    """Pre-quantized checkpoints carry the compute dtype of the machine that made them; use this device's."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and getattr(module, "compute_dtype", None) != dtype:
            module.compute_dtype = dtype


def materialize_gguf(plan: LoadPlan, store_root) -> LoadPlan:
    from .gguf import convert_gguf

    directory = convert_gguf(Path(plan.location) / plan.gguf_file, store_root)
    return replace(plan, location=str(directory), gguf_file=None)


def load_tokenizer(plan: LoadPlan, opts: LoadOptions, padding_side: str = "right"):
    from transformers import AutoTokenizer

    with translated_errors(plan):
        tok = AutoTokenizer.from_pretrained(plan.location, **hub_kwargs(plan, opts))
    if tok.pad_token is None:
        # a pad distinct from eos keeps eos learnable; fall back to eos/unk when the vocabulary has no spare token
        for candidate in ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>"):
            if candidate in tok.get_vocab() and candidate != tok.eos_token:
                tok.pad_token = candidate
                break
        else:
            tok.pad_token = tok.unk_token or tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_weights(plan: LoadPlan, opts: LoadOptions):
    """from_pretrained as the plan says; returns the model on its device, before LoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    from .checkpoint import inspect_checkpoint
    from .memory import check_fits

    device_map = resolve_device_map(opts.device_map)
    device = main_device(device_map)
    dtype = choose_dtype(plan, opts, device)
    config = load_config(plan, opts)
    max_seq_length = check_max_seq_length(config, opts.max_seq_length, opts.rope_scaling)
    if Path(plan.location).is_dir():
        inspect_checkpoint(Path(plan.location), allow_pickle=opts.allow_pickle)
    bits = 4 if plan.prequantized and plan.quant.bits == 16 else plan.quant.bits
    check_fits(plan.name, config, bits, plan.quant.bnb_4bit_use_double_quant, device,
               other_bytes=torch.tensor([], dtype=dtype).element_size())
    kw = dict(hub_kwargs(plan, opts), dtype=dtype, device_map=device_map, output_loading_info=True,
              attn_implementation=opts.attn_implementation, **opts.model_kwargs)
    if not opts.allow_pickle:
        kw["use_safetensors"] = True
    if opts.rope_scaling:
        kw["rope_scaling"] = opts.rope_scaling
    if not plan.prequantized and plan.quant.quantized:
        kw["quantization_config"] = bnb_config(plan, dtype)
    with translated_errors(plan):
        model, info = AutoModelForCausalLM.from_pretrained(plan.location, **kw)
    missing = [k for k in info.get("missing_keys", []) if "lm_head" not in k or not config.tie_word_embeddings]
    if missing or info.get("mismatched_keys"):
        raise CheckpointIncomplete(f"Loading {plan.name!r} from {plan.location}",
                                   found=f"weights missing for {len(missing)} parameter(s) ({missing[:3]}) "
                                         f"or of the wrong shape ({list(info.get('mismatched_keys', []))[:3]})",
                                   fix="use the config.json that belongs to these weights, or re-download the checkpoint")
    if plan.prequantized:
        set_compute_dtype(model, dtype)
    model.config.use_cache = False
    model.max_seq_length = max_seq_length
    return model, dtype, device
