"""What the engine did to one model: the levers on, and each asked-for lever that does not apply to it, with why.

The report is `model.fastload.engine`, also reached as `model.fastload_engine`: a list of lever names (what code checks
with `in`), one object for the model's life; `.skipped` says what a family misses, so a lever never falls back in
silence (e.g. the expert adapters of an MoE family the expert_lora lever cannot compute).
"""

from __future__ import annotations

from fastload.engine.offloaded_checkpoint import offload_blocker
from fastload.model_state import base_model


class EngineReport(list):
    """The names of the levers on, as a list; `skipped` maps a lever that does not apply to the reason."""

    def __init__(self, used=(), skipped: dict[str, str] | None = None):
        super().__init__(used)
        self.skipped = dict(skipped or {})

    def __repr__(self) -> str:
        if not self.skipped:
            return super().__repr__()
        notes = "; ".join(f"{lever}: {why}" for lever, why in self.skipped.items())
        return f"{super().__repr__()} (not applied: {notes})"


EXPERTS_ON_PEFT = ("{} module(s) with adapters on their parameters (fused experts, or what target_parameters names) "
                   "run peft's ParamWrapper path, which builds W + s B A on every call")


def experts_left_to_peft(model) -> list[tuple[str, str]]:
    """(experts class, why) for each adapted experts module the expert_lora lever does not compute (off, or unable)."""
    from fastload.engine.expert_lora import LEVER, expert_blocker, outer_wrappers
    from fastload.model_state import is_patched

    return [(type(outer.get_base_layer()).__name__, expert_blocker(outer) or "the expert_lora lever is off")
            for outer in outer_wrappers(model) if not is_patched(model, outer, LEVER)]


def fused_loss_blocker(model) -> str:
    """Why the fused lm_head + cross-entropy does not apply to this model (it declined)."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(text, attr, None) not in (None, 1, 1.0):
            return f"the model changes the logits after lm_head ({attr}={getattr(text, attr)})"
    if getattr(text, "output_router_logits", False):
        return "the loss adds the routers' load-balancing term (output_router_logits=True)"
    from fastload.engine.fused_loss import decoder_of, head_of

    if decoder_of(model) is None:
        return (f"{type(model).__name__} keeps its decoder elsewhere than at .model, and its family is not one whose "
                "forward the fused loss is known to match")
    if head_of(model) is None:
        return (f"{type(model).__name__} has no lm_head the fused loss can call (its output layer is named otherwise "
                "or sits inside a prediction head)")
    return "the output head is not a plain, frozen Linear"


def skipped_levers(model, settings, used: list[str], device: str) -> dict[str, str]:
    """Each lever asked for that leaves part of this model on the plain path, and why."""
    skipped = {}
    left = experts_left_to_peft(model)
    if settings.fused_lora and left:  # the fused path covers Linear projections; expert_lora covers the experts
        skipped["fused_lora"] = EXPERTS_ON_PEFT.format(len(left))
    if settings.expert_lora and left:
        skipped["expert_lora"] = "; ".join(sorted({why for _, why in left}))
    if settings.fused_loss and "fused_loss" not in used:
        skipped["fused_loss"] = fused_loss_blocker(base_model(model))
    if settings.offload_checkpointing and device == "cuda" and "offload_checkpointing" not in used:
        skipped["offload_checkpointing"] = offload_blocker(base_model(model))
    if settings.host_embedding and device == "cuda" and "host_embedding" not in used:
        from fastload.engine.host_embedding import declined_reason

        # apply_engine asked the lever just before: why it declined then, or the table it moved is back on the GPU
        skipped["host_embedding"] = (declined_reason(base_model(model))
                                     or "the table went back to the GPU after it was moved (a resize or a cast)")
    kernels = {"triton_rmsnorm", "triton_swiglu", "triton_rope"}
    if settings.kernels and device == "cuda" and not kernels <= set(used):
        missing = ", ".join(sorted(kernels - set(used)))
        skipped["kernels"] = (f"{missing}: written for Llama-style RMSNorm/SwiGLU/attention modules as "
                              f"transformers writes them, which {type(model).__name__} lacks (or triton is not "
                              "installed)")
    return skipped

