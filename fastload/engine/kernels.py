"""Fused Triton kernels from liger-kernel (when installed) on this instance's RMSNorm, SwiGLU and RoPE."""

from __future__ import annotations

import importlib.util
import types


def install_kernels(model) -> list[str]:
    if importlib.util.find_spec("liger_kernel") is None:
        return []
    used = []
    if _rmsnorm(model):
        used.append("liger_rmsnorm")
    if _swiglu(model):
        used.append("liger_swiglu")
    if _rope(model):
        used.append("liger_rope")
    return used


def _rmsnorm(model) -> bool:
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    count = 0
    for module in model.modules():
        name = type(module).__name__
        # Llama/Mistral/Qwen RMSNorm: weight * x_normed, no offset (Gemma's (1 + weight) differs: left alone)
        if name in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm") and hasattr(module, "weight"):
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))

            def forward(self, hidden_states, _eps=eps):
                return LigerRMSNormFunction.apply(hidden_states, self.weight, _eps, 0.0, "llama", False)

            module.forward = types.MethodType(forward, module)
            count += 1
    return count > 0


def _swiglu(model) -> bool:
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    count = 0
    for module in model.modules():
        if type(module).__name__ in ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP") and \
                getattr(module.config, "hidden_act", "silu") in ("silu", "swish"):
            def forward(self, x):
                return self.down_proj(LigerSiLUMulFunction.apply(self.gate_proj(x), self.up_proj(x)))

            module.forward = types.MethodType(forward, module)
            count += 1
    return count > 0


def _rope(model) -> bool:
    from liger_kernel.ops.rope import LigerRopeFunction

    from .rotary import install_rotary_attention

    def rotate(query, key, cos, sin):
        return LigerRopeFunction.apply(query, key, cos, sin)

    return install_rotary_attention(model, rotate) > 0
