"""Per-expert checkpoints read into fused expert parameters by the direct 4-bit load.

transformers 5 keeps a mixture-of-experts layer's experts as fused 3-D parameters (gate_up_proj, down_proj) while
the hub's checkpoints (and transformers' own save_pretrained) keep one tensor per expert and projection; its loader
stacks them on the way in. The direct load does the same from the layouts in expert_layouts.toml (data: one entry
per family), so such a checkpoint is read once, with the experts quantized as each layer's stack is complete,
instead of going through transformers' per-tensor pipeline. The result is transformers' model bit for bit
(tests/load/test_fast_load.py).
"""

from __future__ import annotations

import functools
import tomllib
from importlib import resources

import torch


@functools.cache
def _layouts() -> dict[str, dict]:
    text = resources.files(__package__).joinpath("expert_layouts.toml").read_text(encoding="utf-8")
    return {model_type: layout for layout in tomllib.loads(text).values() for model_type in layout["model_types"]}


def layout_of(model_type: str | None) -> dict | None:
    """The per-expert layout of a model type, or None where there is none to read."""
    return _layouts().get(model_type or "")


def renamed(names, layout: dict | None) -> dict[str, str]:
    """Model name -> checkpoint name for every checkpoint name, after the layout's renames (a substring replaced
    wherever it occurs, or with a leading ^ only at the start of the name)."""
    mapping = {}
    for name in names:
        model_name = name
        for old, new in (layout or {}).get("renames", []):
            if old.startswith("^"):
                if model_name.startswith(old[1:]):
                    model_name = new + model_name[len(old) - 1:]
            else:
                model_name = model_name.replace(old, new)
        mapping[model_name] = name
    return mapping


def expert_sources(key: str, experts: int, layout: dict | None) -> list[str] | None:
    """The per-expert tensors (model names, in stacking order: every expert of the first projection, then every
    expert of the second) the fused parameter `key` is made of, or None when the layout has no stack for it."""
    for ending, pieces in (layout or {}).get("stacks", {}).items():
        if key == ending or key.endswith("." + ending):
            prefix = key[:len(key) - len(ending)]
            return [prefix + piece.format(e=e) for piece in pieces for e in range(experts)]
    return None


def stacked(parts: list[torch.Tensor], experts: int) -> torch.Tensor:
    """The fused parameter from its per-expert tensors in expert_sources' order: each projection stacked over the
    experts, two projections then concatenated along dim 1 (as transformers' MergeModulelist and Concatenate)."""
    projections = [torch.stack(parts[i:i + experts], dim=0) for i in range(0, len(parts), experts)]
    return projections[0] if len(projections) == 1 else torch.cat(projections, dim=1)
