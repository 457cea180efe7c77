"""The settings objects: the one place where fastload's defaults are written."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from fastload.errors import InvalidOption

QUANT_TYPES = ("nf4", "fp4")
DTYPE_NAMES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
               "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}
STORAGE_NAMES = ("uint8", "bfloat16", "float16", "float32")

DEFAULT_MAX_SEQ_LENGTH = 2048
"""Tokens per training sequence when none is asked; capped at the model's own positions."""
DEFAULT_SEED = 3407
"""Seed of LoRA's initialisation and of training when none is given (Unsloth's notebooks use the same)."""


def env_switch(name: str) -> bool | None:
    """An on/off environment variable: True for 1/true/on/yes, False for 0/false/off/no, None when unset or else."""
    value = os.environ.get(name, "").strip().lower()
    return True if value in ("1", "true", "on", "yes") else False if value in ("0", "false", "off", "no") else None


def dtype_name(value: Any, option: str) -> str | None:
    """Normalise a dtype given as torch.dtype or string to its canonical name ('bfloat16'...)."""
    if value is None or value == "auto":
        return None
    name = str(value).replace("torch.", "")
    if name not in DTYPE_NAMES:
        raise InvalidOption(f"{option}={value!r} is not a dtype fastload can use",
                            found=f"accepted: {sorted(set(DTYPE_NAMES.values()))} or None for automatic",
                            fix=f"pass e.g. {option}='bfloat16' or torch.float16")
    return DTYPE_NAMES[name]


@dataclass(frozen=True)
class QuantSettings:
    """How the base weights are quantized; field names are BitsAndBytesConfig's so every field is reachable."""

    load_in_4bit: bool = True
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: str | None = None  # None: chosen per device (devices.choose_compute_dtype)
    bnb_4bit_quant_storage: str = "uint8"
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: tuple[str, ...] | None = None
    llm_int8_enable_fp32_cpu_offload: bool = False
    llm_int8_has_fp16_weight: bool = False
    quantize_experts: bool = True
    """fastload's own, not BitsAndBytesConfig's: store MoE experts' fused 3-D weights 4-bit too (bitsandbytes leaves
    them 16-bit); False keeps them in the compute dtype. The store's 16-bit experts serve both, so not fingerprinted."""

    def __post_init__(self):
        for name in ("load_in_4bit", "load_in_8bit", "bnb_4bit_use_double_quant", "llm_int8_enable_fp32_cpu_offload",
                     "llm_int8_has_fp16_weight", "quantize_experts"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidOption(f"{name}={getattr(self, name)!r}", found="it must be True or False",
                                    fix=f"pass {name}=True or {name}=False")
        if self.load_in_4bit and self.load_in_8bit:
            raise InvalidOption("load_in_4bit=True and load_in_8bit=True were both asked for",
                                found="a model is quantized either to 4 bits or to 8 bits",
                                fix="keep one: load_in_4bit=True (QLoRA, default) or load_in_8bit=True (LLM.int8)")
        if self.bnb_4bit_quant_type not in QUANT_TYPES:
            raise InvalidOption(f"bnb_4bit_quant_type={self.bnb_4bit_quant_type!r} is not a bitsandbytes 4-bit type",
                                found=f"supported types: {', '.join(QUANT_TYPES)}",
                                fix="use 'nf4' (default, best for normally distributed weights) or 'fp4'")
        if self.bnb_4bit_quant_storage not in STORAGE_NAMES:
            raise InvalidOption(f"bnb_4bit_quant_storage={self.bnb_4bit_quant_storage!r} is not a storage dtype",
                                found=f"supported: {', '.join(STORAGE_NAMES)}", fix="use 'uint8' (default)")
        if not isinstance(self.llm_int8_threshold, (int, float)) or self.llm_int8_threshold < 0:
            raise InvalidOption(f"llm_int8_threshold={self.llm_int8_threshold!r}", found="it must be a number >= 0 "
                                "(the outlier magnitude above which LLM.int8 keeps a column in 16-bit)",
                                fix="use 6.0 (default)")

    @property
    def quantized(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit

    @property
    def bits(self) -> int:
        return 4 if self.load_in_4bit else 8 if self.load_in_8bit else 16

    def describe(self) -> str:
        if self.load_in_4bit:
            dq = "+double quant" if self.bnb_4bit_use_double_quant else ""
            return f"4-bit {self.bnb_4bit_quant_type}{dq}, compute {self.bnb_4bit_compute_dtype or 'auto'}"
        if self.load_in_8bit:
            return f"8-bit LLM.int8 (threshold {self.llm_int8_threshold})"
        return "16-bit (not quantized)"

    def fingerprint(self) -> str:
        """A short stable hash of the fields that change the stored weights (compute dtype does not)."""
        data = dataclasses.asdict(self)
        data.pop("bnb_4bit_compute_dtype")
        data.pop("quantize_experts")
        blob = json.dumps(data, sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @classmethod
    def from_options(cls, quantization_config: Any = None, **options: Any) -> QuantSettings:
        """Build from from_pretrained's options; a user's BitsAndBytesConfig (or dict) wins over the options."""
        if quantization_config is not None:
            cfg = quantization_config
            cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
            method = str(getattr(cfg.get("quant_method"), "value", cfg.get("quant_method", "bitsandbytes")))
            method = method.split(".")[-1].lower().replace("_", "")
            if method != "bitsandbytes":
                raise InvalidOption(f"quantization_config with quant_method={method!r} was given",
                                    found="fastload quantizes with bitsandbytes only",
                                    fix="pass a transformers BitsAndBytesConfig, or load_in_4bit/load_in_8bit options")
            own = {k: options[k] for k in ("quantize_experts",) if k in options}  # not a BitsAndBytesConfig field
            options = {**{k: cfg[k] for k in (f.name for f in dataclasses.fields(cls)) if k in cfg}, **own}
            options.setdefault("load_in_4bit", bool(cfg.get("load_in_4bit")))
            options.setdefault("load_in_8bit", bool(cfg.get("load_in_8bit")))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(options) - known
        if unknown:
            close = sorted({m for u in unknown for m in difflib.get_close_matches(u, known, n=2)})
            raise InvalidOption(f"unknown quantization option(s): {sorted(unknown)}", found=f"known: {sorted(known)}",
                                fix=f"did you mean {', '.join(close)}?" if close else "remove the option, or use one "
                                    "of the known BitsAndBytesConfig fields")
        if "bnb_4bit_compute_dtype" in options:
            options["bnb_4bit_compute_dtype"] = dtype_name(options["bnb_4bit_compute_dtype"], "bnb_4bit_compute_dtype")
        if "bnb_4bit_quant_storage" in options and options["bnb_4bit_quant_storage"] is not None:
            options["bnb_4bit_quant_storage"] = str(options["bnb_4bit_quant_storage"]).replace("torch.", "")
        if options.get("llm_int8_skip_modules") is not None:
            options["llm_int8_skip_modules"] = tuple(options["llm_int8_skip_modules"])
        if options.get("load_in_8bit") and "load_in_4bit" not in options:
            options["load_in_4bit"] = False
        return cls(**options)


LORA_DEFAULTS: dict[str, Any] = {"r": 16, "lora_alpha": 16, "lora_dropout": 0.0, "bias": "none"}


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter settings; `target_modules=None` means: every linear projection of the decoder layers."""

    r: int = LORA_DEFAULTS["r"]
    lora_alpha: float = LORA_DEFAULTS["lora_alpha"]
    lora_dropout: float = LORA_DEFAULTS["lora_dropout"]
    bias: str = LORA_DEFAULTS["bias"]
    target_modules: tuple[str, ...] | str | None = None  # names, or peft's regular expression over full module names
    extra: dict[str, Any] = field(default_factory=dict)  # any other peft.LoraConfig field (use_rslora, ...)

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise InvalidOption(f"LoRA rank r={self.r!r} was asked for", found="the rank must be a positive integer",
                                fix="use r=16 (default) or another power of two such as 8, 32, 64")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool) or self.lora_alpha <= 0:
            raise InvalidOption(f"lora_alpha={self.lora_alpha!r}", found="alpha must be a positive number "
                                "(the adapters' output is scaled by alpha / r)",
                                fix="use lora_alpha=16 (default) or 2 * r")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise InvalidOption(f"lora_dropout={self.lora_dropout!r}", found="dropout must be in [0, 1)",
                                fix="use 0.0 (default, fastest)")
        if self.bias not in ("none", "all", "lora_only"):
            raise InvalidOption(f"LoRA bias={self.bias!r}", found="peft accepts 'none', 'all' or 'lora_only'",
                                fix="use bias='none' (default)")

    @classmethod
    def from_user(cls, lora: Any) -> LoraSettings:
        """Accept a dict of LoraConfig fields, a peft.LoraConfig, or a LoraSettings."""
        if isinstance(lora, LoraSettings):
            return lora
        if hasattr(lora, "to_dict") and hasattr(lora, "peft_type"):
            raw = {k: v for k, v in lora.to_dict().items() if v is not None}
            defaults = type(lora)().to_dict()
            raw = {k: v for k, v in raw.items() if k in LORA_DEFAULTS or k == "target_modules" or defaults.get(k) != v}
        elif isinstance(lora, dict):
            raw = dict(lora)
        else:
            raise InvalidOption(f"lora={lora!r} was given", found=f"a {type(lora).__name__}",
                                fix="pass a dict of LoraConfig fields, a peft.LoraConfig, or None for no adapters")
        for drop in ("peft_type", "task_type", "base_model_name_or_path", "revision"):
            raw.pop(drop, None)
        if not raw.get("inference_mode"):  # peft's default; True (frozen adapters) is the user's to keep
            raw.pop("inference_mode", None)
        targets = raw.pop("target_modules", None)
        if isinstance(targets, str):  # a name stays a name; anything else is peft's pattern over full module names
            targets = None if targets == "all-linear" else (targets,) if targets.isidentifier() else targets
        elif targets is not None:
            targets = tuple(sorted(targets))
        main = {k: raw.pop(k) for k in list(raw) if k in LORA_DEFAULTS}
        return cls(target_modules=targets, extra=raw, **main)
