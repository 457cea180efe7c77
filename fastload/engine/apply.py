"""Which levers a model gets: `EngineSettings` (what the user asked) and `apply_engine`, which turns on the levers
that pay on this device, scoped to the model instance, and logs each in one line."""

from __future__ import annotations

from dataclasses import dataclass

from fastload._log import logger
from fastload.engine.expert_lora import install_expert_lora
from fastload.engine.fused_lora import install_fused_lora
from fastload.engine.fused_loss import install_fused_loss
from fastload.engine.host_embedding import host_embedding_active, install_host_embedding
from fastload.engine.kernels import RMSNORM, ROPE, ROUTER, SWIGLU, install_kernels
from fastload.engine.llama4_moe import install_llama4_moe
from fastload.engine.offloaded_checkpoint import install_engine_checkpointing
from fastload.engine.report import EngineReport, skipped_levers
from fastload.errors import InvalidOption
from fastload.model_state import base_model, set_engine_report, state_of

LEVERS = ("fused_lora", "expert_lora", "fused_loss", "offload_checkpointing", "cuda_graphs", "kernels",
          "host_embedding")


@dataclass(frozen=True)
class EngineSettings:
    """Which levers to use; `True` means: where it pays (GPU-only levers stay off on the CPU)."""

    fused_lora: bool = True              # each LoRA projection as one autograd function in the compute dtype
    expert_lora: bool = True             # LoRA on fused MoE experts as s (x A_e^T) B_e^T per routed token, grouped
                                         # by expert: never peft's W + s B A for every expert on every call
    fused_loss: bool = True              # chunked lm_head + cross-entropy: never the full fp32 logits
    offload_checkpointing: bool = True   # checkpointed layer inputs kept in pinned CPU memory (CUDA only)
    cuda_graphs: bool = False            # checkpointed layers (and the loss) replayed as CUDA graphs once a shape
                                         # repeats (CUDA): ~1.6x on a 1B model, for a memory pool of ~one layer's
                                         # recomputation (opt-in: it trades memory for speed)
    kernels: bool = True                 # Triton RMSNorm, SwiGLU and RoPE where triton is installed (CUDA)
    host_embedding: bool = True          # a frozen, untied input embedding in pinned host memory, its rows read in
                                         # place by the GPU (CUDA): 1 GiB less on Llama-3 8B

    @classmethod
    def from_user(cls, value) -> "EngineSettings":
        if isinstance(value, EngineSettings):
            return value
        if value is True or value is None:
            return cls()
        if value is False:
            return cls(**{lever: False for lever in LEVERS})
        if isinstance(value, dict):
            unknown = set(value) - set(LEVERS)
            if unknown:
                raise InvalidOption(f"engine={value!r}", found=f"unknown lever(s) {sorted(unknown)}",
                                    fix=f"use keys among {', '.join(LEVERS)}")
            return cls(**value)
        raise InvalidOption(f"engine={value!r}", found=f"a {type(value).__name__}", fix="pass True, False or a dict")


def apply_engine(model, settings: EngineSettings, gradient_checkpointing: bool) -> EngineReport:
    """Turn on the levers for this model instance and say which are on.

    Safe to call again (e.g. once get_peft_model has added adapters): a lever already installed is kept as it is,
    one that now applies is installed, and the model keeps one report object, updated in place.

    Args:
        model: the loaded model, or its peft wrapper.
        settings: which levers to use (EngineSettings.from_user).
        gradient_checkpointing: whether the model checkpoints (the checkpointing levers need it).

    Returns:
        The model's EngineReport (also `model.fastload.engine` and `model.fastload_engine`): the names of the levers
        on, as a list; `skipped` says which asked-for levers leave part of this model on the plain path, and why.
    """
    base = base_model(model)
    state = state_of(base)
    device = next(base.parameters()).device.type
    if settings.fused_lora:
        install_fused_lora(model)
    if settings.expert_lora:
        install_llama4_moe(model)  # Llama-4's experts, reached through the layer around them (marked patched)
        install_expert_lora(model)
    if settings.fused_loss:
        install_fused_loss(base)
    if (settings.offload_checkpointing or settings.cuda_graphs) and gradient_checkpointing and device == "cuda":
        install_engine_checkpointing(base, offload=settings.offload_checkpointing, graphs=settings.cuda_graphs)
    if settings.kernels and device == "cuda":
        install_kernels(base)
    if settings.host_embedding and device == "cuda":
        install_host_embedding(base)
    used = levers_on(base)
    skipped = skipped_levers(model, settings, used, device)
    first = state.engine is None
    report = EngineReport() if first else state.engine
    changed = first or list(report) != used or report.skipped != skipped
    report[:], report.skipped = used, skipped
    state.engine_settings = settings
    set_engine_report(base, report)
    if changed:
        logger.info("engine: %s%s", ", ".join(used) if used else "no lever applies here",
                    "".join(f"; not {lever}: {why}" for lever, why in skipped.items()))
    return report


def reapply_engine(model) -> None:
    """The levers again after the model changed under them (its embeddings resized: the new table is moved to host
    memory again), with the settings it was loaded with; nothing for a model loaded without the engine."""
    state = state_of(model)
    if state.engine_settings is not None:
        apply_engine(model, state.engine_settings, bool(state.checkpointing) and not state.fsdp)


def levers_on(base) -> list[str]:
    """The levers on in this model now, in LEVERS' order (kernels by name): what its modules were patched with,
    and the levers of the checkpoint function the engine registered."""
    state = state_of(base)
    patched = {lever for module in base.modules() for lever in state.levers_of(module)}
    registered = state.checkpoint_function
    on = patched | set(registered.levers if registered is not None else ())
    if "host_embedding" in on and not host_embedding_active(base):  # its table went back to the GPU since
        on.discard("host_embedding")
    order = (*(lever for lever in LEVERS if lever != "kernels"), RMSNORM, SWIGLU, ROPE, ROUTER)
    return [lever for lever in order if lever in on]
