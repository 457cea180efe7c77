"""Gradient checkpointing, in one place: on and off, the train/generate mode switch, and keeping it on through a
Trainer's own setup.

Checkpointing is non-reentrant with input grads on (LoRA gets gradients through a frozen embedding) and the KV cache
off. The engine may register a checkpoint function of its own (offloaded inputs, CUDA graphs) on the model's state;
this module points the checkpointed layers at it each time checkpointing is turned on, since transformers'
`gradient_checkpointing_enable` puts torch's back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback

from fastload._log import logger
from fastload.model_state import CheckpointFunction, base_model, state_of
from fastload.train.single_use import single_use_contexts

_base = base_model  # the name the rest of fastload imports from here


def turn_on_checkpointing(base) -> None:
    """transformers' non-reentrant checkpointing, by its current name where it has one (activation_*: 5.2x on;
    the gradient_* names then warn that they are deprecated), else by the old one. Its graphs are marked single-use
    (torch recomputes them for every backward), so fastload's kernels may write gradients over what they saved."""
    kwargs = {"use_reentrant": False, "context_fn": single_use_contexts}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


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


def checkpointed_layers(model) -> list:
    """The modules transformers checkpoints (each calls its `_gradient_checkpointing_func`)."""
    # transformers sets the function on each layer instance: a dict lookup, where hasattr's miss on every other
    # module raises inside nn.Module.__getattr__ (~2,700 modules in an 8B with LoRA)
    return [m for m in _base(model).modules()
            if "_gradient_checkpointing_func" in vars(m) and getattr(m, "gradient_checkpointing", False)]


def enable_checkpointing(model) -> bool:
    """Non-reentrant checkpointing, input grads on, no KV cache; the registered checkpoint function, if any.
    False (said once per model) where the architecture's transformers code cannot checkpoint: training then keeps
    every layer's activations, instead of failing on transformers' ValueError."""
    base = _base(model)
    if not getattr(base, "supports_gradient_checkpointing", True):
        state = state_of(base)
        if not state.checkpointing_refused:
            logger.warning("gradient checkpointing: off, %s's transformers code does not support it (training keeps "
                           "every layer's activations: more memory at long sequences); pass "
                           "gradient_checkpointing=False to load without asking for it", type(base).__name__)
            state.checkpointing_refused = True
        base.config.use_cache = False
        return False
    turn_on_checkpointing(base)
    base.enable_input_require_grads()
    base.config.use_cache = False
    state_of(base).checkpointing = True
    _use_registered_function(base)
    return True


def disable_checkpointing(model) -> None:
    """Checkpointing off for good (not a mode switch): the registered function and its levers go too."""
    turn_off_checkpointing(_base(model))
    state = state_of(model)
    state.checkpointing = False
    _drop_registered_function(state)


def register_checkpoint_function(model, function: Callable, applies: Callable[[Any], bool],
                                 levers: tuple[str, ...]) -> None:
    """The engine's checkpoint function for this model's checkpointed layers, now and whenever checkpointing is
    turned on again.

    Args:
        model: the model (or its peft wrapper).
        function: called as transformers calls its checkpoint function: function(layer_call, *args, **kwargs).
        applies: applies(base_model) is False once the function may no longer serve (e.g. dropout added since).
        levers: the engine report's lever names that stand or fall with the function.
    """
    state_of(model).checkpoint_function = CheckpointFunction(function, applies, tuple(levers))
    _use_registered_function(_base(model))


def _use_registered_function(base) -> bool:
    """Point the checkpointed layers at the registered function; False when none is (or it no longer applies)."""
    state = state_of(base)
    registered = state.checkpoint_function
    if registered is None:
        return False
    if not registered.applies(base):
        logger.info("engine: %s off (dropout > 0 added); plain checkpointing", " and ".join(registered.levers))
        _drop_registered_function(state)
        return False
    for layer in checkpointed_layers(base):
        layer._gradient_checkpointing_func = registered.function
    return True


def _drop_registered_function(state) -> None:
    """Forget the registered function and take its levers out of the engine's report (the same report object)."""
    registered, state.checkpoint_function = state.checkpoint_function, None
    if registered is not None and state.engine is not None:
        state.engine[:] = [lever for lever in state.engine if lever not in registered.levers]


# -- the train / generate mode switch -------------------------------------------------------------------------------

def for_inference(model):
    """Checkpointing off, KV cache on, eval mode; remembers whether to turn checkpointing back on."""
    base = _base(model)
    state = state_of(base)
    if state.checkpointing is None:
        state.checkpointing = is_checkpointing(model)
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
    if state_of(base).checkpointing and not is_checkpointing(model):
        enable_checkpointing(model)
    return model


# -- checkpointing that survives the trainer ------------------------------------------------------------------------

def checkpointing_state(model) -> dict[str, Any]:
    """What a user would check: is checkpointing on, is it reentrant, do inputs require grad (for frozen layers).

    use_reentrant is None for a checkpoint function other than torch's (fastload's engine may install one).
    """
    reentrant = None
    funcs = checkpoint_functions(model)
    if funcs:
        func = next(iter(funcs.values()))
        if _is_torch_checkpoint(func):
            reentrant = func.keywords.get("use_reentrant", True) is not False
    return {"enabled": is_checkpointing(model), "use_reentrant": reentrant,
            "input_grads": bool(getattr(_base(model), "_require_grads_hooks", None))}


def _is_torch_checkpoint(func) -> bool:
    from torch.utils.checkpoint import checkpoint

    return getattr(func, "func", None) is checkpoint


def _same_function(f, g) -> bool:
    """Two checkpoint functions that behave alike (a trainer re-creates an equal partial every time)."""
    return f is g or (getattr(f, "func", f) is getattr(g, "func", g)
                      and getattr(f, "args", ()) == getattr(g, "args", ())
                      and getattr(f, "keywords", {}) == getattr(g, "keywords", {}))


def checkpoint_functions(model) -> dict:
    """The checkpoint function of every checkpointed layer, by module."""
    return {m: m._gradient_checkpointing_func for m in _base(model).modules()
            if getattr(m, "gradient_checkpointing", False) and getattr(m, "_gradient_checkpointing_func", None)}


def ensure_checkpointing(model, saved: dict | None = None, allow_reentrant: bool = False) -> bool:
    """Put back the checkpoint functions the model had (`saved`) where a trainer replaced them, make torch's
    checkpointing non-reentrant unless allowed, and enable input grads; True when something had to be fixed."""
    fixed = False
    if saved and not allow_reentrant:
        for module, func in saved.items():
            if not _same_function(module._gradient_checkpointing_func, func) or not module.gradient_checkpointing:
                module._gradient_checkpointing_func, module.gradient_checkpointing = func, True
                fixed = True
    state = checkpointing_state(model)
    if not state["enabled"]:
        return fixed
    base = _base(model)
    if state["use_reentrant"] and not allow_reentrant:
        turn_on_checkpointing(base)
        fixed = True
    if not checkpointing_state(model)["input_grads"]:
        base.enable_input_require_grads()
        fixed = True
    return fixed


class CheckpointingGuard(TrainerCallback):
    """Once the Trainer has applied its own checkpointing settings (train begin), restores the model's: the same
    functions (non-reentrant, or the engine's) and input grads. One per trainer (add_fastload_parts checks)."""

    def __init__(self, model):
        self.saved = checkpoint_functions(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        asked = (args.gradient_checkpointing_kwargs or {}).get("use_reentrant") if args.gradient_checkpointing \
            else None
        if ensure_checkpointing(model, self.saved, allow_reentrant=asked is True):
            logger.info("gradient checkpointing: the model's own (non-reentrant, input grads on) restored after "
                        "the trainer's setup")


def checkpointing_guard(model) -> CheckpointingGuard:
    """The TrainerCallback that keeps this model's checkpointing through a Trainer's setup."""
    return CheckpointingGuard(model)


def _flags_off(base) -> list:
    """Turn off the `gradient_checkpointing` flag of every layer that has it on, keeping their checkpoint functions;
    returns those layers (for _flags_on)."""
    layers = [m for m in base.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for layer in layers:
        layer.gradient_checkpointing = False
    return layers


def _flags_on(layers: list) -> None:
    for layer in layers:
        layer.gradient_checkpointing = True


class steady_checkpointing:
    """While a TRL trainer trains: its switches of checkpointing around each reference or scoring pass
    (gradient_checkpointing_disable, then _enable with the args' settings, on the model) flip the checkpointed
    layers' flags instead, as generation_step does, so the functions the model trains with (fastload's single-use
    contexts, the engine's offloading one) survive every step; transformers' enable would put torch's back. An
    enable with nothing switched off before it, or anything after the context, is transformers' own."""

    NAMES = {"off": ("gradient_checkpointing_disable", "activation_checkpointing_disable"),
             "on": ("gradient_checkpointing_enable", "activation_checkpointing_enable")}

    def __init__(self, model):
        self.base = _base(model)
        self.switched: list[list] = []
        self.inside_another = False  # an evaluation inside train(): the outer context's switches stay in place

    def _off(self, *args, **kwargs) -> None:
        self.switched.append(_flags_off(self.base))

    def _on(self, name: str):
        def on(*args, **kwargs) -> None:
            if self.switched:
                _flags_on(self.switched.pop())
                return
            self._restore()  # nothing switched off here (the Trainer's own enable at train start): transformers'
            try:
                getattr(self.base, name)(*args, **kwargs)
            finally:
                self.__enter__()
        return on

    def __enter__(self):
        owner = getattr(self.base.__dict__.get(self.NAMES["off"][0]), "__self__", None)
        self.inside_another = isinstance(owner, steady_checkpointing) and owner is not self
        if self.inside_another:
            return self
        for name in self.NAMES["off"]:
            setattr(self.base, name, self._off)
        for name in self.NAMES["on"]:
            setattr(self.base, name, self._on(name))
        return self

    def _restore(self) -> None:
        for name in (*self.NAMES["off"], *self.NAMES["on"]):
            self.base.__dict__.pop(name, None)

    def __exit__(self, *exc) -> None:
        if not self.inside_another:
            self._restore()


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
        self.layers = _flags_off(base)
        self.use_cache = base.config.use_cache
        base.config.use_cache = True
        return self.model

    def __exit__(self, *exc) -> None:
        base = _base(self.model)
        _flags_on(self.layers)
        base.config.use_cache = self.use_cache
