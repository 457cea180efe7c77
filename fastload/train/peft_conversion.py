"""peft's renaming of MoE LoRA targets from transformers 4 to 5, kept off configs written for the model as it is.

So that adapters trained on transformers 4's per-expert Linear layers still load, peft (0.19 to 0.21 at least) moves
every target_modules entry named gate_proj, up_proj or down_proj into target_parameters (the fused experts) on
every model type transformers converts like Qwen2-MoE or Mixtral: DeepSeek-V2/V3, GLM-4-MoE, ERNIE-MoE, Qwen3-Next
and more. On a config written against the loaded model that drops the adapters of the dense MLP layers and of the
shared experts, whose Linear layers carry those names, and doubles the experts' rank: fastload's default LoRA on
DeepSeek-V3 came back with none on its first dense layers or its shared experts while its log said otherwise (peft
issue 3711). A config that fastload built from the model's own modules, or that already names the model's fused
expert parameters (so it was written for transformers 5), is left as written; any other, such as an adapter trained
under transformers 4, is converted as peft does.
"""

from __future__ import annotations

import contextlib
import functools
import threading

BUILT_FOR_THE_MODEL = "_fastload_targets_from_the_model"  # set on LoraConfigs fastload builds (not a config field)


_SKIPPING_THE_MAPPING = threading.local()


def mark_built_for_the_model(config) -> None:
    """Say that `config`'s targets are the loaded model's own module names: never renamed."""
    object.__setattr__(config, BUILT_FOR_THE_MODEL, True)


def written_for(config, model) -> bool:
    """Whether `config` was written for `model` as transformers 5 builds it (then peft's renaming must not apply)."""
    if getattr(config, BUILT_FOR_THE_MODEL, False):
        return True
    wanted = [t for t in (getattr(config, "target_parameters", None) or []) if isinstance(t, str)]
    if not wanted:
        return False
    return any(name == t or name.endswith("." + t) for name, _ in model.named_parameters() for t in wanted)


def keep_targets_as_written() -> None:
    """Wrap peft's conversion once per process so that it skips the configs `written_for` the model. peft imports
    the function from its module at each injection, so the wrapper in the module is the one it calls."""
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:  # a peft without the renaming: nothing to keep off
        return
    original = getattr(conversion, "convert_peft_config_for_transformers", None)
    if original is None or getattr(original, BUILT_FOR_THE_MODEL, False):
        return
    _skip_the_mapping_when_asked(conversion)

    @functools.wraps(original)
    def convert_unless_written_for_the_model(peft_config, model, *args, **kwargs):
        if written_for(peft_config, model):
            return None
        return original(peft_config, model, *args, **kwargs)

    setattr(convert_unless_written_for_the_model, BUILT_FOR_THE_MODEL, True)
    conversion.convert_peft_config_for_transformers = convert_unless_written_for_the_model


def _skip_the_mapping_when_asked(conversion) -> None:
    """Wrap peft's import of transformers' get_model_conversion_mapping: inside `mapping_not_needed` it returns None.
    peft asks for the mapping at every injection only to hand it to the renaming above; transformers builds it for
    every model type on its first use in a process (0.3-0.6 s of regular expressions on a CI core, counted in the
    LoRA step of a load that never went through transformers' loader)."""
    original = getattr(conversion, "get_model_conversion_mapping", None)
    if original is None:
        return

    @functools.wraps(original)
    def mapping_unless_not_needed(*args, **kwargs):
        if getattr(_SKIPPING_THE_MAPPING, "on", False):
            return None
        return original(*args, **kwargs)

    conversion.get_model_conversion_mapping = mapping_unless_not_needed


@contextlib.contextmanager
def mapping_not_needed(config):
    """While peft adds the adapters of `config`, a config fastload built for the model (so never renamed), on this
    thread: peft's request for transformers' conversion mapping gets None instead of building it."""
    if not getattr(config, BUILT_FOR_THE_MODEL, False):
        yield
        return
    _SKIPPING_THE_MAPPING.on = True
    try:
        yield
    finally:
        _SKIPPING_THE_MAPPING.on = False
