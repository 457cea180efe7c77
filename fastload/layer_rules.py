"""Per-family rules about single layers (layer_rules.toml): which ones LoRA leaves alone and which stay 16-bit.

Some families use a linear layer's weight directly instead of running the layer (transformers' Mamba mixers), so
an adapter there would never run and a 4-bit weight would be multiplied packed. The rules are data: one table per
rule, naming the model types, the layers' leaf names and why.
"""

from __future__ import annotations

import functools
import importlib.util
import tomllib
from importlib import resources


@functools.cache
def _rules() -> tuple[dict, ...]:
    text = resources.files(__package__).joinpath("layer_rules.toml").read_text(encoding="utf-8")
    return tuple(tomllib.loads(text).values())


def _matching(model_type: str | None) -> list[dict]:
    return [rule for rule in _rules() if (model_type or "") in rule["model_types"]
            and ("only_with" not in rule or installed(rule["only_with"]))]


@functools.cache
def installed(package: str) -> bool:
    """Whether `package` can be imported here (found, not imported: mamba_ssm's import initialises CUDA)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def left_alone_by_lora(model_type: str | None) -> dict[str, str]:
    """Leaf name -> why, for the layers LoRA never adapts in this model type (every rule's layers but `lora` ones)."""
    return {name: rule["why"] for rule in _matching(model_type) if not rule.get("lora", False)
            for name in rule["modules"]}


def kept_unquantized(model_type: str | None) -> dict[str, str]:
    """Leaf name -> why, for the layers that stay 16-bit when this model type is quantized (`unquantized` rules)."""
    return {name: rule["why"] for rule in _matching(model_type) if rule.get("unquantized", False)
            for name in rule["modules"]}
