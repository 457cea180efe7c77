"""What fastload knows about one loaded model, kept in one object on it: `model.fastload`.

The plan it came from, the backend, what the engine did (the report, the settings, the modules it patched), whether
checkpointing is meant to be on and the checkpoint function the engine registered for it. Nothing is written onto
other libraries' objects (a module's own `extra_repr` aside, so that `print(model)` shows what the engine patched).

The state sits on the transformers model itself, under any peft wrapper: peft's wrappers hand unknown attributes down
to it, so `peft_model.fastload` finds it, and it survives `get_peft_model`, `unload` and `merge_and_unload`, which keep
that model. `model.fastload_engine` is one documented alias of `model.fastload.engine` (the same report object).
"""

from __future__ import annotations

import functools
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ATTRIBUTE = "fastload"
ENGINE_ALIAS = "fastload_engine"  # named in the README: the engine's report, `"fused_lora" in model.fastload_engine`


@dataclass
class CheckpointFunction:
    """A checkpoint function for the model's checkpointed layers, registered by the engine.

    applies(model) says whether it may still serve the model (dropout added since needs torch's own checkpoint);
    levers are the engine report's names that stand or fall with it.
    """

    function: Callable
    applies: Callable[[Any], bool]
    levers: tuple[str, ...] = ()


@dataclass(eq=False)
class ModelState:
    """fastload's state for one model; `state_of(model)` finds it through peft wrappers."""

    plan: Any = None                      # the LoadPlan the model was loaded from
    backend: str | None = None            # "native" or "unsloth"
    quantized_now: bool = False           # quantized while loading (not read pre-quantized)
    direct_load: bool = False             # filled by fastload's direct 4-bit load (load/fast_4bit.py)
    engine: Any = None                    # the EngineReport; one object for the model's life (apply_engine updates it)
    engine_settings: Any = None           # the EngineSettings asked at load
    checkpointing: bool | None = None     # checkpointing meant to be on (kept through generation mode); None: unset
    checkpoint_function: CheckpointFunction | None = None
    checkpointing_refused: bool = False   # the architecture cannot checkpoint (said once: train/checkpointing.py)
    task: str | None = None               # "causal-lm" or "sequence-classification" (fastload/load/task.py)
    load_phases: dict = field(default_factory=dict)  # seconds per phase of the load (fastload/load/phases.py)
    fsdp: dict | None = None              # loaded for FSDP2-QLoRA: {"activation_checkpointing": bool}
    graphs: Any = None                    # the cuda_graphs lever's ModelGraphs, made on first use
    patched: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)  # module -> levers

    def levers_of(self, module) -> tuple[str, ...]:
        """The levers that patched this module (empty when none did)."""
        return tuple(self.patched.get(module, ()))

    def __repr__(self) -> str:
        source = getattr(self.plan, "source", None)
        return (f"ModelState(source={source!r}, backend={self.backend!r}, engine={self.engine!r}, "
                f"checkpointing={self.checkpointing!r})")


def base_model(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def state_of(model, create: bool = True) -> ModelState:
    """The model's state, found through peft wrappers; made on first use unless create=False, which returns a
    detached empty state for a model fastload never touched (for reading only)."""
    base = base_model(model)
    state = base.__dict__.get(ATTRIBUTE)
    if state is None:
        state = ModelState()
        if create:
            base.__dict__[ATTRIBUTE] = state  # not nn.Module.__setattr__: a plain attribute, never a submodule
    return state


def set_engine_report(model, report) -> None:
    """Keep the engine's report on the state and under its one alias, `model.fastload_engine`."""
    base = base_model(model)
    state_of(base).engine = report
    base.__dict__[ENGINE_ALIAS] = report


def mark_patched(model, module, lever: str) -> None:
    """Record that `lever` replaced this module's forward, and let `print(model)` say so."""
    state = state_of(model)
    levers = state.patched.setdefault(module, [])
    if lever not in levers:
        levers.append(lever)
    if "extra_repr" not in module.__dict__:
        module.extra_repr = types.MethodType(functools.partial(_patched_extra_repr, state=state), module)


def unmark_patched(model, module, lever: str) -> None:
    """Record that `lever` no longer holds for this module (what it changed was undone since)."""
    levers = state_of(model).patched.get(module)
    if levers and lever in levers:
        levers.remove(lever)


def is_patched(model, module, lever: str) -> bool:
    return lever in state_of(model, create=False).levers_of(module)


def _patched_extra_repr(module, state: ModelState) -> str:
    """The class's own extra_repr plus the levers that patched this instance (looked up when printed)."""
    own = type(module).extra_repr(module)
    levers = state.levers_of(module)
    note = f"fastload: {', '.join(levers)}" if levers else ""
    return ", ".join(part for part in (own, note) if part)
