"""Llama attention with the rotary embedding applied by one fused kernel (liger-kernel's), on this instance only.

transformers applies RoPE with a handful of elementwise ops (two halves, a negation, a concatenation, two
products, a sum) for q and k, forward, recomputation and backward; liger-kernel does it in place in one Triton
kernel each way. transformers calls its module-level apply_rotary_pos_emb from LlamaAttention.forward, so the
only way to change it for one model without patching transformers is this instance's forward: the same steps,
the rotation swapped. Anything beyond plain training (a KV cache, positional extras) goes to the original forward.
"""

from __future__ import annotations

import sys
import types

from fastload.model_state import is_patched, mark_patched
from fastload.structure import class_named

LEVER = "liger_rope"  # the name the engine report gives it (kernels.py)

CLASSES = ("LlamaAttention",)  # same forward; Mistral/Qwen add sliding windows or norms: left to transformers
_SKIP = ("cache", "past_key_values", "cache_position")


def _interface(module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    implementation = module.config._attn_implementation
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)
    return eager if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]


def rotary_attention_forward(original, rotate, applies=None):
    """A forward for one attention module: `rotate(q, k, cos, sin) -> (q, k)` replaces transformers' rotation
    (where `applies(hidden_states)`, if given)."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
        if (args or position_embeddings is None or not self.training
                or any(kwargs.get(name) is not None for name in _SKIP)
                or (applies is not None and not applies(hidden_states))):
            return original(hidden_states, position_embeddings, attention_mask, *args, **kwargs)
        kwargs = {name: value for name, value in kwargs.items() if name not in _SKIP}
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = rotate(query, key, cos, sin)
        output, weights = _interface(self)(self, query, key, value, attention_mask,
                                           dropout=self.attention_dropout,  # (training only: see above)
                                           scaling=self.scaling, **kwargs)
        output = output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(output), weights

    return forward


def install_rotary_attention(model, rotate, applies=None) -> int:
    count = 0
    for module in model.modules():
        if class_named(module, CLASSES) and not is_patched(model, module, LEVER):
            module.forward = types.MethodType(rotary_attention_forward(module.forward, rotate, applies), module)
            mark_patched(model, module, LEVER)
            count += 1
    return count
