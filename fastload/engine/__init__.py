"""The performance engine: speed-ups scoped to one loaded model instance, never to transformers' classes.

Each lever is a small module; `apply_engine(model, ...)` turns on the ones that pay on this device and logs each.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastload._log import logger

LEVERS = ("fused_lora", "fused_loss", "offload_checkpointing", "cuda_graphs", "kernels")


@dataclass(frozen=True)
class EngineSettings:
    """Which levers to use; `True` means: where it pays (GPU-only levers stay off on the CPU)."""

    fused_lora: bool = True              # each LoRA projection as one autograd function in the compute dtype
    fused_loss: bool = True              # chunked lm_head + cross-entropy: never the full fp32 logits
    offload_checkpointing: bool = True   # checkpointed layer inputs kept in pinned CPU memory (CUDA only)
    cuda_graphs: bool = False            # checkpointed layers (and the loss) replayed as CUDA graphs once a shape
                                         # repeats (CUDA): ~1.6x on a 1B model, for a memory pool of ~one layer's
                                         # recomputation (opt-in: it trades memory for speed)
    kernels: bool = True                 # Triton RMSNorm / SwiGLU, liger-kernel RoPE where installed (CUDA)

    @classmethod
    def from_user(cls, value) -> "EngineSettings":
        if isinstance(value, EngineSettings):
            return value
        if value is True or value is None:
            return cls()
        if value is False:
            return cls(**{lever: False for lever in LEVERS})
        if isinstance(value, dict):
            from fastload.errors import InvalidOption

            unknown = set(value) - set(LEVERS)
            if unknown:
                raise InvalidOption(f"engine={value!r}", found=f"unknown lever(s) {sorted(unknown)}",
                                    fix=f"use keys among {', '.join(LEVERS)}")
            return cls(**value)
        from fastload.errors import InvalidOption

        raise InvalidOption(f"engine={value!r}", found=f"a {type(value).__name__}", fix="pass True, False or a dict")


def install_fused_lora_if_any(model) -> bool:
    """The fused LoRA lever on this instance's adapters (none yet with lora=None: get_peft_model adds it later)."""
    from fastload.engine.fused_lora import install_fused_lora

    return install_fused_lora(model) > 0


def apply_engine(model, settings: EngineSettings, gradient_checkpointing: bool) -> list[str]:
    """Turn on the levers for this model instance; returns the names of those turned on (an EngineReport, whose
    `skipped` says which asked-for levers leave part of this model on the plain path, and why)."""
    from fastload.train.checkpointing import _base

    base = _base(model)
    device = next(base.parameters()).device.type
    used = []
    if settings.fused_lora and install_fused_lora_if_any(model):
        used.append("fused_lora")
    if settings.fused_loss:
        from fastload.engine.fused_loss import install_fused_loss

        if install_fused_loss(base):
            used.append("fused_loss")
    if (settings.offload_checkpointing or settings.cuda_graphs) and gradient_checkpointing and device == "cuda":
        from fastload.engine.offloaded_checkpoint import install_engine_checkpointing

        used += install_engine_checkpointing(base, offload=settings.offload_checkpointing,
                                             graphs=settings.cuda_graphs)
    if settings.kernels and device == "cuda":
        from fastload.engine.kernels import install_kernels

        used += install_kernels(base)
    from fastload.engine.report import EngineReport, skipped_levers

    report = EngineReport(used, skipped_levers(model, settings, used, device))
    logger.info("engine: %s%s", ", ".join(used) if used else "no lever applies here",
                "".join(f"; not {lever}: {why}" for lever, why in report.skipped.items()))
    return report
