"""Fused Triton kernels on this instance's RMSNorm, SwiGLU, RoPE and MoE routers (CUDA only).

fastload's own lean kernels (fastload.engine.triton.layers and .rope) wherever triton is installed. A norm whose
weight is trained (at the time of the call) runs transformers' forward.
"""

from __future__ import annotations

import types

from fastload.engine.rotary import LEVER as ROPE
from fastload.engine.rotary import install_rotary_attention
from fastload.engine.router import LEVER as ROUTER
from fastload.engine.router import install_topk_router
from fastload.engine.triton.launch import triton_available, triton_runs_on
from fastload.engine.triton.layers import rms_norm, swiglu
from fastload.engine.triton.rope import rotate
from fastload.model_state import is_patched, mark_patched, state_of
from fastload.structure import class_named

RMSNORM, SWIGLU = "triton_rmsnorm", "triton_swiglu"  # the engine report's names

# weight * x_normed, no offset (Gemma's (1 + weight) differs: left alone); the MoE families' norms compute the same
# (on an H100 the Qwen3-MoE step spent 15 ms of 242 in two steps on its norms' fp32 casts alone, 2026-12-06)
NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MixtralRMSNorm", "Qwen2MoeRMSNorm",
         "Qwen3MoeRMSNorm")
MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def install_kernels(model) -> list[str]:
    used = []
    if triton_available("cuda"):
        if _rmsnorm(model):
            used.append(RMSNORM)
        if _swiglu(model):
            used.append(SWIGLU)
        if _rope(model):
            used.append(ROPE)
        if install_topk_router(model):
            used.append(ROUTER)
    return used


def _rmsnorm(model) -> bool:
    for module in model.modules():
        if class_named(module, NORMS) and hasattr(module, "weight") and not is_patched(model, module, RMSNORM):
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))

            def forward(self, hidden_states, _eps=eps, _original=module.forward):
                if self.weight.requires_grad or not triton_runs_on(hidden_states):  # trained later, or on another
                    # device than Triton launches on: transformers computes
                    return _original(hidden_states)
                return rms_norm(hidden_states, self.weight, _eps)

            module.forward = types.MethodType(forward, module)
            mark_patched(model, module, RMSNORM)
    return _any_patched(model, RMSNORM)


def _swiglu(model) -> bool:
    for module in model.modules():
        if (class_named(module, MLPS) and getattr(module.config, "hidden_act", "silu") in ("silu", "swish")
                and not is_patched(model, module, SWIGLU)):
            def forward(self, x, _original=module.forward):
                if not triton_runs_on(x):
                    return _original(x)
                return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))

            module.forward = types.MethodType(forward, module)
            mark_patched(model, module, SWIGLU)
    return _any_patched(model, SWIGLU)


def _rope(model) -> bool:
    install_rotary_attention(model, rotate, applies=triton_runs_on)
    return _any_patched(model, ROPE)


def _any_patched(model, lever: str) -> bool:
    """Whether the lever is on somewhere in this model (patched now or by an earlier call: installs are once)."""
    state = state_of(model, create=False)  # once, not per module: each lookup goes through peft's wrapper
    return any(lever in state.levers_of(module) for module in model.modules())
