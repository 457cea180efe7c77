"""LoRA deltas of fused MoE experts, split into the per-expert tensors a 16-bit checkpoint keeps.

transformers 5 trains a mixture-of-experts layer's experts as fused 3-D parameters (gate_up_proj, down_proj), while
the hub's checkpoints, and transformers' own save_pretrained, keep one tensor per expert and projection. The direct
load stacks them by the layouts in fastload/load/expert_layouts.toml; a merge into such a source runs that stacking
backwards: each per-expert tensor gets its slice of the fused delta, and the merged checkpoint keeps the source's
names and layout.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

from fastload.errors import AdapterError
from fastload.load.expert_layouts import expert_sources, layout_of, renamed

CACHED_DELTAS = 4  # fused deltas kept while a shard is read: a layer's gate_up and down, with room for interleaving


class ExpertDeltas:
    """For each per-expert tensor of the source, the slice of a fused expert delta it takes."""

    def __init__(self, deltas, model_type: str | None, source_names: set[str]):
        self.deltas = deltas
        layout = layout_of(model_type)
        model_to_source = renamed(source_names, layout)
        self.pieces: dict[str, tuple[str, int, int, int]] = {}  # source name -> (fused key, projection, of, expert)
        for key in deltas.modules:
            if key in source_names:
                continue  # the source keeps this parameter fused too
            names = _per_expert_names(key, layout, model_to_source)
            if names is None:
                continue
            for projection, per_expert in enumerate(names):
                for expert, model_name in enumerate(per_expert):
                    self.pieces[model_to_source[model_name]] = (key, projection, len(names), expert)
        self.fused_keys = {key for key, *_ in self.pieces.values()}
        self._cache: OrderedDict = OrderedDict()

    def __contains__(self, name: str) -> bool:
        return name in self.pieces

    def apply(self, name: str, tensor):
        """The source's per-expert tensor plus its slice of the fused delta, added in fp32, in the tensor's dtype."""
        import torch

        key, projection, projections, expert = self.pieces[name]
        delta = self._delta(key)
        rows = delta.shape[1] // projections  # the projections were concatenated along dim 1 (gate before up)
        piece = delta[expert, projection * rows:(projection + 1) * rows] if expert < delta.shape[0] else None
        if piece is None or piece.shape != tensor.shape:
            found = (f"the fused delta {tuple(delta.shape)} has no expert {expert}" if piece is None else
                     f"its slice {tuple(piece.shape)} of the fused delta {tuple(delta.shape)} vs the expert's weight "
                     f"{tuple(tensor.shape)}")
            raise AdapterError(f"Merging the LoRA delta of {key} into {name}", found=found,
                               fix="merge into the base the adapter was trained on, or use source='dequantized'")
        self.deltas.used.add(key)
        return (tensor.to(torch.float32) + piece).to(tensor.dtype)

    def _delta(self, key: str):
        """The fused delta in fp32 on the CPU, computed once while the shard reads that layer's experts."""
        import torch

        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        with torch.no_grad():
            delta = self.deltas.modules[key].get_delta_weight(self.deltas.adapter).to("cpu", torch.float32)
        self._cache[key] = delta
        if len(self._cache) > CACHED_DELTAS:
            self._cache.popitem(last=False)
        return delta


def _per_expert_names(key: str, layout: dict | None, model_to_source: dict[str, str]) -> list[list[str]] | None:
    """The model names of the per-expert tensors the fused parameter `key` is made of, one list per projection in
    stacking order, every expert the source holds; None when the layout has no stack for it or the source lacks
    them."""
    first = expert_sources(key, 1, layout)
    if first is None or first[0] not in model_to_source:
        return None
    experts = next(e for e in itertools.count(1) if expert_sources(key, e + 1, layout)[e] not in model_to_source)
    names = expert_sources(key, experts, layout)
    if any(name not in model_to_source for name in names):
        return None
    return [names[i:i + experts] for i in range(0, len(names), experts)]
