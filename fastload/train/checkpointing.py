"""Gradient checkpointing and the train/generate mode switch."""

from __future__ import annotations


def _base(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def enable_checkpointing(model) -> None:
    """Non-reentrant checkpointing, input grads on (LoRA gets gradients through a frozen embedding), no KV cache."""
    base = _base(model)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()
    base.config.use_cache = False
    model._fastload_checkpointing = True
    # gradient_checkpointing_enable put torch's checkpointing back: the engine's function survives a mode switch
    from fastload.engine.offloaded_checkpoint import reinstall_engine_checkpointing

    reinstall_engine_checkpointing(base)


def is_checkpointing(model) -> bool:
    return bool(getattr(_base(model), "is_gradient_checkpointing", False))


def for_inference(model):
    """Checkpointing off, KV cache on, eval mode; remembers whether to turn checkpointing back on."""
    base = _base(model)
    model._fastload_checkpointing = getattr(model, "_fastload_checkpointing", is_checkpointing(model))
    if is_checkpointing(model):
        base.gradient_checkpointing_disable()
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


class generation_step:
    """A context manager for the generation inside a training step: checkpointing off, KV cache on; on exit both
    back as they were. Train/eval mode is left to the caller (an RL trainer samples in the mode it trains in).

    Cheap enough for every step (an RL trainer generates each step): it flips the checkpointed layers'
    `gradient_checkpointing` flags and keeps their checkpoint functions (the engine's offloading one included),
    where for_inference/for_training disable and re-install checkpointing and its input-grad hooks.
    """

    def __init__(self, model):
        self.model = model
        self.layers: list = []

    def __enter__(self):
        base = _base(self.model)
        self.layers = [m for m in base.modules() if getattr(m, "gradient_checkpointing", False) is True]
        for layer in self.layers:
            layer.gradient_checkpointing = False
        self.use_cache = base.config.use_cache
        base.config.use_cache = True
        return self.model

    def __exit__(self, *exc) -> None:
        base = _base(self.model)
        for layer in self.layers:
            layer.gradient_checkpointing = True
        base.config.use_cache = self.use_cache
