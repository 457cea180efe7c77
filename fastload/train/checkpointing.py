"""Gradient checkpointing and the train/generate mode switch."""

from __future__ import annotations


def _base(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def enable_checkpointing(model) -> None:
    """Non-reentrant checkpointing, input grads on (LoRA gets gradients through a frozen embedding), no KV cache."""
    base = _base(model)
    turn_on_checkpointing(base)
    base.enable_input_require_grads()
    base.config.use_cache = False
    model._fastload_checkpointing = True
    # gradient_checkpointing_enable put torch's checkpointing back: the engine's function survives a mode switch
    from fastload.engine.offloaded_checkpoint import reinstall_engine_checkpointing

    reinstall_engine_checkpointing(base)


def turn_on_checkpointing(base) -> None:
    """transformers' non-reentrant checkpointing, by its current name where it has one (activation_*: 5.2x on;
    the gradient_* names then warn that they are deprecated), else by the old one."""
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def turn_off_checkpointing(base) -> None:
    if hasattr(base, "activation_checkpointing_disable"):
        base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_disable()


def is_checkpointing(model) -> bool:
    base = _base(model)
    if hasattr(type(base), "is_activation_checkpointing"):
        return bool(base.is_activation_checkpointing)
    return bool(getattr(base, "is_gradient_checkpointing", False))


def for_inference(model):
    """Checkpointing off, KV cache on, eval mode; remembers whether to turn checkpointing back on."""
    base = _base(model)
    model._fastload_checkpointing = getattr(model, "_fastload_checkpointing", is_checkpointing(model))
    if is_checkpointing(model):
        turn_off_checkpointing(base)
    base.config.use_cache = True
    model.eval()
    return model


def for_training(model):
    """Back to training: train mode, cache off, checkpointing on again if it was on."""
    base = _base(model)
    model.train()
    base.config.use_cache = False
    if getattr(model, "_fastload_checkpointing", False) and not is_checkpointing(model):
        enable_checkpointing(model)
    return model
