"""Attention with the rotary embedding applied by one fused kernel, on this instance only.

transformers applies RoPE with a handful of elementwise ops (two halves, a negation, a concatenation, two
products, a sum) for q and k, forward, recomputation and backward; fastload's Triton kernel does q and k in one
launch each way (fastload.engine.triton.rope). transformers calls its module-level apply_rotary_pos_emb from the
attention's forward, so the only way to change it for one model without patching transformers is this instance's
forward: the same steps, the rotation swapped. The classes taken are those whose forward is Llama's up to two
differences, listed per class: per-head q/k norms before the rotation (Qwen3) and where the sliding window comes
from. Anything beyond plain training (a KV cache, positional extras) goes to the original forward.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types

from fastload.model_state import is_patched, mark_patched

LEVER = "triton_rope"  # the name the engine report gives it (kernels.py)

# transformers' attention classes whose forward is Llama's up to per-head q/k norms before the rotation and the
# sliding window passed to attention (tests/engine/test_rotary.py holds each to transformers' forward)
CLASSES = ("LlamaAttention", "GraniteAttention", "Qwen2MoeAttention", "MistralAttention", "MixtralAttention",
           "Qwen2Attention", "Qwen3Attention", "Qwen3MoeAttention")
_SKIP = ("cache", "past_key_values", "cache_position")
# how those differences read in a class's own forward: the layout is read from there once per class, so a transformers
# release that computes attention otherwise keeps its own forward rather than this one's copy of the old steps
ROTATION = "apply_rotary_pos_emb(query_states, key_states, cos, sin)"
HEAD_NORMS = "self.q_norm(self.q_proj(hidden_states).view(hidden_shape))"
WINDOWS = {"module": "sliding_window=self.sliding_window",
           "config": 'sliding_window=getattr(self.config, "sliding_window"'}


@functools.cache
def layout_of(attention_class) -> tuple[bool, str | None] | None:
    """(q/k norms per head before the rotation, where the sliding window comes from: "module", "config" or None) as
    the class's forward says, or None when its forward does not read as one of those (no rotation of q and k as
    Llama's, a norm or a window in another form)."""
    try:
        source = inspect.getsource(attention_class.forward)
    except (OSError, TypeError):
        return None
    head_norms = HEAD_NORMS in source
    windows = [name for name, text in WINDOWS.items() if text in source]
    if (ROTATION not in source or ("q_norm" in source and not head_norms)
            or ("sliding_window=" in source and len(windows) != 1)):
        return None
    return head_norms, (windows[0] if windows else None)


def _interface(module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    implementation = module.config._attn_implementation
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)
    return eager if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]


def _window_kwargs(module, window_from) -> dict:
    if window_from == "module":
        return {"sliding_window": module.sliding_window}
    if window_from == "config":
        return {"sliding_window": getattr(module.config, "sliding_window", None)}
    return {}


def rotary_attention_forward(rotate, applies=None, head_norms: bool = False, window_from=None):
    """A forward for one attention module: `rotate(q, k, cos, sin) -> (q, k)`, or None where it does not take
    these tensors, replaces transformers' rotation (where `applies(hidden_states)`, if given). Every other call
    goes to the class's forward (read from `self`, so a deep copy of the model computes with its own weights)."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
        if (args or position_embeddings is None or not self.training
                or any(kwargs.get(name) is not None for name in _SKIP)
                or (applies is not None and not applies(hidden_states))):
            return type(self).forward(self, hidden_states, position_embeddings, attention_mask, *args, **kwargs)
        kwargs = {name: value for name, value in kwargs.items() if name not in _SKIP}
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape)
        key = self.k_proj(hidden_states).view(hidden_shape)
        if head_norms:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        rotated = rotate(query, key, cos, sin)
        if rotated is None:  # a shape or layout the kernel does not take: the module's own rotation
            rotated = sys.modules[type(self).__module__].apply_rotary_pos_emb(query, key, cos, sin)
        query, key = rotated
        output, weights = _interface(self)(self, query, key, value, attention_mask,
                                           dropout=self.attention_dropout,  # (training only: see above)
                                           scaling=self.scaling, **_window_kwargs(self, window_from), **kwargs)
        output = output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(output), weights

    return forward


def install_rotary_attention(model, rotate, applies=None) -> int:
    """Give each attention module of a class in CLASSES the forward with `rotate`; returns how many now have it."""
    count = 0
    for module in model.modules():
        if type(module).__name__ not in CLASSES or is_patched(model, module, LEVER):
            continue
        layout = layout_of(type(module))
        if layout is not None:
            forward = rotary_attention_forward(rotate, applies, *layout)
            module.forward = types.MethodType(forward, module)
            mark_patched(model, module, LEVER)
            count += 1
    return count
