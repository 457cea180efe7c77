"""LoRA targets found from the model's structure, and adapters added with peft."""

from __future__ import annotations

import contextlib
import functools
import re
import tomllib
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any

import torch

from fastload._log import logger
from fastload.errors import AdapterError
from fastload.load.phases import phase
from fastload.model_state import state_of
from fastload.settings import LoraSettings
from fastload.structure import decoder_layers, is_linear, router_widths
from fastload.train.adapter_draws import (
    AdapterDraws,
    EarlyDraws,
    all_linear,
    draw_like_peft,
    predicted_adapters,
    sharing_the_interpreter,
)
from fastload.train.lora_targets import find_lora_targets, left_alone
from fastload.train.peft_conversion import keep_targets_as_written, mapping_not_needed, mark_built_for_the_model

# LoraConfig options peft's ParamWrapper (LoRA on a bare nn.Parameter) refuses
PARAM_LORA_UNSUPPORTED = ("use_dora", "lora_bias", "fan_in_fan_out")


def find_expert_parameters(model) -> tuple[list[str], int, int]:
    """The fused expert weights of a mixture-of-experts model: 3-D parameters whose first axis counts the experts
    (transformers 5 keeps Mixtral's, Qwen3-MoE's, gpt-oss's experts so, not as Linear modules).

    Returns:
        (names peft's `target_parameters` matches, e.g. ["experts.down_proj", "experts.gate_up_proj"], the number
        of experts, the number of layers holding them); ([], 0, 0) for a dense model. Routers are 2-D: never listed.
    """
    experts = router_widths(getattr(model, "config", None))
    layers = decoder_layers(model)
    if not experts or layers is None:
        return [], 0, 0
    names, layers_with = set(), 0
    for layer in layers:
        found = {f"{mname.split('.')[-1]}.{pname}" for mname, module in layer.named_modules()
                 if mname and not isinstance(module, torch.nn.modules.conv._ConvNd)
                 for pname, p in module.named_parameters(recurse=False) if p.ndim == 3 and p.shape[0] in experts}
        names |= found
        layers_with += bool(found)
    sizes = {p.shape[0] for layer in layers for n, p in layer.named_parameters() if n.endswith(tuple(names))}
    return sorted(names), max(sizes, default=0), layers_with


def experts_blocked_by(model, names: list[str], settings: LoraSettings) -> str | None:
    """Why the expert weights cannot carry LoRA with these settings, or None when they can."""
    blockers = [f"{key}={value!r}" for key, value in (("lora_dropout", settings.lora_dropout),
                                                      *((k, settings.extra.get(k)) for k in PARAM_LORA_UNSUPPORTED))
                if value]
    if blockers:
        return f"peft's LoRA on parameters (ParamWrapper) does not support {', '.join(blockers)}"
    stored = {str(p.dtype).replace("torch.", "") for n, p in model.named_parameters()
              if n.endswith(tuple(names)) and not p.is_floating_point()}
    if stored:
        return f"the expert weights are stored quantized ({', '.join(sorted(stored))}), which peft cannot adapt"
    return None


def _expert_targets(model, settings: LoraSettings) -> tuple[list[str], str]:
    """target_parameters for the default LoRA and the words the load log uses for them ("" for a dense model)."""
    names, experts, layers = find_expert_parameters(model)
    if not names:
        return [], ""
    reason = experts_blocked_by(model, names, settings)
    params = "/".join(sorted({n.split(".")[-1] for n in names}))
    if reason:
        logger.warning("LoRA leaves the experts' %s untrained (%d experts x %d layers): %s", params, experts, layers,
                       reason)
        return [], ""
    return names, f" + experts' {params} ({experts} experts x {layers} layers)"


@functools.cache
def _mlp_to_experts() -> dict[str, list[str]]:
    text = resources.files("fastload").joinpath("expert_names.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)["mlp_to_experts"]


def _experts_named(model, targets: list[str], settings: LoraSettings,
                   leaf_names: set[str]) -> tuple[list[str], list[str], str]:
    """(module targets, expert target_parameters, log words) for target_modules that name an MoE model's MLP
    projections (gate_proj/up_proj/down_proj, Mixtral's w1/w3/w2) where its experts hold them as fused 3-D
    parameters (expert_names.toml): those experts are adapted, as the user asked, instead of the names being
    refused as missing modules. A name some module also has (a shared expert's) stays a module target."""
    names, experts, layers = find_expert_parameters(model)
    by_leaf = {name.split(".")[-1]: name for name in names}
    chosen = {}
    for target in targets:
        found = next((by_leaf[c] for c in _mlp_to_experts().get(target, ()) if c in by_leaf), None)
        if found is not None:
            chosen[target] = found
    if not chosen:
        return targets, [], ""
    kept = [t for t in targets if t not in chosen or t in leaf_names]
    params = sorted(set(chosen.values()))
    words = "/".join(sorted({p.split(".")[-1] for p in params}))
    reason = experts_blocked_by(model, params, settings)
    if reason:
        logger.warning("LoRA leaves the experts' %s untrained (%d experts x %d layers; target_modules names %s): %s",
                       words, experts, layers, ", ".join(chosen), reason)
        return kept, [], ""
    return kept, params, f" + experts' {words} for {', '.join(chosen)} ({experts} experts x {layers} layers)"


def _checked_parameters(model, wanted: list[str]) -> str:
    """The log words for target_parameters the user gave, each one checked to name some parameter (peft matches a
    name's end and says nothing of one that matches none: a typo left those weights untrained)."""
    params = [name for name, _ in model.named_parameters()]
    unknown = [w for w in wanted if not any(n == w or n.endswith("." + w) for n in params)]
    if unknown:
        experts, _, _ = find_expert_parameters(model)
        raise AdapterError(f"Adding LoRA on the parameters {wanted}", found=f"no parameter is named {unknown}",
                           fix=f"fix the names (this model's expert weights: {experts or 'none'}) or leave "
                               "target_parameters unset (the experts are adapted by default)")
    return f" + parameters {', '.join(wanted)}"


def towers_outside_decoder(model, targets: list[str]) -> list[str]:
    """Top-level parts beside the decoder (Gemma-3's vision tower) holding modules of the targets' names.

    peft matches target_modules by leaf name anywhere in the model, so q_proj would also adapt a SigLIP tower's;
    a text fine-tune leaves such towers frozen. Any module of a target's name counts, Linear or not: Gemma-4's vision
    tower wraps its Linear layers in a clipping module named q_proj, which peft would refuse. Returns their module
    names (e.g. ["model.vision_tower"]).
    """
    layers = decoder_layers(model)
    path = next((name for name, module in model.named_modules() if module is layers), None)
    if path is None:
        return []
    inside = {id(m) for m in layers.modules()}
    towers = set()
    for name, module in model.named_modules():
        if name.split(".")[-1] in targets and id(module) not in inside:
            parts = name.split(".")
            towers.add(next(".".join(parts[:i]) for i in range(1, len(parts) + 1)
                            if not (path + ".").startswith(".".join(parts[:i]) + ".")))
    return sorted(towers)


def indexers_in_decoder(model, targets: list[str]) -> list[str]:
    """Sparse-attention indexers inside the decoder layers (DeepSeek-V3.2's, HY-V4's: a module whose class is named
    ...Indexer) holding linear layers of the targets' names. An indexer scores keys only to pick the top-k each query
    attends to; the choice is not differentiable, so no gradient reaches its projections from the loss (the models'
    authors train it with a loss of its own), and LoRA there would only add parameters that never change."""
    layers = decoder_layers(model)
    if layers is None:
        return []
    prefix = next((name for name, module in model.named_modules() if module is layers), "")
    found = []
    for name, module in layers.named_modules():
        if type(module).__name__.endswith("Indexer") and any(
                leaf.split(".")[-1] in targets and is_linear(m) for leaf, m in module.named_modules()):
            found.append(f"{prefix}.{name}" if prefix else name)
    return found


def only_in_indexers(model, targets: list[str]) -> set[str]:
    """The target names whose every linear layer sits in a sparse-attention indexer."""
    indexers = indexers_in_decoder(model, targets)
    if not indexers:
        return set()
    inside = {id(m) for name, m in model.named_modules() if any(name.startswith(i + ".") for i in indexers)}
    return {t for t in targets
            if all(id(m) in inside for n, m in model.named_modules() if n.split(".")[-1] == t and is_linear(m))}


def _decoder_only(model, targets: list[str], settings: LoraSettings) -> tuple[LoraSettings, str]:
    """Settings whose exclude_modules keeps the default LoRA off other towers and off sparse-attention indexers, and
    the words the log adds."""
    if settings.target_modules or "exclude_modules" in settings.extra:
        return settings, ""
    towers = towers_outside_decoder(model, targets)
    indexers = indexers_in_decoder(model, targets)
    if not towers and not indexers:
        return settings, ""
    # every layer's indexer by one pattern: its layer index as any number
    indexer_patterns = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(n)) for n in indexers})
    pattern = "(" + "|".join([re.escape(t) for t in towers] + indexer_patterns) + r")\..*"
    notes = []
    if towers:
        notes.append(f"decoder only: {', '.join(towers)} left frozen")
    if indexers:
        relative = sorted({re.sub(r"^.*\.\d+\.", "", n) for n in indexers})
        notes.append(f"{', '.join(relative)} left frozen in {len(indexers)} layers: a sparse-attention indexer picks "
                     "keys by top-k, so no gradient reaches it from the loss")
    return replace(settings, extra={**settings.extra, "exclude_modules": pattern}), f" ({'; '.join(notes)})"


def has_adapters(model) -> bool:
    return bool(getattr(model, "peft_config", None))


def untrained_adapter(model) -> bool:
    """peft starts every lora_B at zero, so all-zero B matrices mean no training step and no loaded save: replacing
    the adapter loses nothing."""
    b_matrices = [p for name, p in model.named_parameters() if "lora_B" in name]
    return bool(b_matrices) and all(not torch.count_nonzero(p) for p in b_matrices)


@dataclass
class LoraPlan:
    """What apply_lora decided from the model before peft touches it: the targets, peft's config, whether the
    adapters are built empty and filled here, and the words the log line adds."""

    targets: list[str]
    settings: LoraSettings
    config: Any
    fill_here: bool
    notes: str


def plan_lora(model, settings: LoraSettings) -> LoraPlan:
    """The targets and peft's LoraConfig for this model, every check that can refuse them made before any layer is
    wrapped (peft refuses some midway, with other layers already wrapped)."""
    if isinstance(settings.target_modules, str):
        return _plan_pattern(model, settings)
    targets = list(settings.target_modules) if settings.target_modules else find_lora_targets(model)
    leaf_names = {n.split(".")[-1] for n, _ in model.named_modules()}
    if "target_parameters" in settings.extra:
        experts, experts_note = [], _checked_parameters(model, list(settings.extra["target_parameters"] or []))
    elif settings.target_modules:
        targets, experts, experts_note = _experts_named(model, targets, settings, leaf_names)
        settings = replace(settings, target_modules=targets)
    else:
        experts, experts_note = _expert_targets(model, settings)
    if experts:
        settings = replace(settings, extra={**settings.extra, "target_parameters": experts})
    settings, towers_note = _decoder_only(model, targets, settings)
    if not settings.target_modules:  # names only a frozen indexer holds (HY-V4's wk, wq_b) are no target
        targets = [t for t in targets if t not in only_in_indexers(model, targets)]
    missing = [t for t in targets if t not in leaf_names]
    if missing:
        experts_too = find_expert_parameters(model)[0]
        raise AdapterError(f"Adding LoRA on {targets}", found=f"the model has no module named {missing}",
                           fix=f"leave target_modules unset (the default: {find_lora_targets(model)}"
                               f"{f', and the experts {experts_too}' if experts_too else ''}) or fix the names")
    never = left_alone(model)
    refused = sorted(set(never) & set(targets))
    if refused:
        raise AdapterError(f"Adding LoRA on {targets}",
                           found="; ".join(f"{name} cannot carry LoRA in a {model.config.model_type} model: "
                                           f"{never[name]}" for name in refused),
                           fix=f"leave {', '.join(refused)} out of target_modules (the default targets: "
                               f"{find_lora_targets(model)})")
    linear = {n.split(".")[-1] for n, m in model.named_modules() if n.split(".")[-1] in never and is_linear(m)}
    left_note = "" if settings.target_modules else _left_alone_note(
        {name: why for name, why in never.items() if name in linear})
    config = _lora_config(model, settings, targets)
    # found targets are linear: A and B too; named ones where every layer they name is (an Unsloth notebook's list)
    fill_here = _default_init(config) and (not settings.target_modules or all_linear(model, settings.target_modules,
                                                                                     config.exclude_modules))
    return LoraPlan(targets, settings, config, fill_here, experts_note + towers_note + left_note)


def _plan_pattern(model, settings: LoraSettings) -> LoraPlan:
    """target_modules as peft's regular expression, matched against full module names: it must match a layer, and
    none a family's rules leave alone; peft initialises the adapters itself."""
    pattern = settings.target_modules
    modules = dict(model.named_modules())
    try:
        matched = [name for name in modules if re.fullmatch(pattern, name)]
    except re.error as e:
        raise AdapterError(f"Adding LoRA on target_modules={pattern!r}", found=f"not a regular expression: {e}",
                           fix=f"pass a list of layer names such as {find_lora_targets(model)}, or a valid "
                               f"pattern over full module names") from e
    if not matched:
        raise AdapterError(f"Adding LoRA on target_modules={pattern!r}",
                           found="no module's full name matches it (peft matches a pattern against the whole name, "
                                 "e.g. 'model.layers.0.self_attn.q_proj')",
                           fix=f"match full names (r'.*\\.(q|v)_proj'), or pass a list of layer names such as "
                               f"{find_lora_targets(model)}")
    other = [f"{name} ({type(modules[name]).__name__})" for name in matched if not _peft_adaptable(modules[name])]
    if other:  # peft would refuse it midway, with the layers before it already wrapped
        raise AdapterError(f"Adding LoRA on target_modules={pattern!r}",
                           found=f"it matches {len(other)} module(s) LoRA cannot adapt: {', '.join(other[:3])}",
                           fix=f"narrow the pattern to layers (linear, embedding, convolution), or pass a list of "
                               f"layer names such as {find_lora_targets(model)}")
    never = left_alone(model)
    refused = sorted({name.rpartition(".")[2] for name in matched} & set(never))
    if refused:
        raise AdapterError(f"Adding LoRA on target_modules={pattern!r}",
                           found="; ".join(f"it matches {name}, which cannot carry LoRA in a "
                                           f"{model.config.model_type} model: {never[name]}" for name in refused),
                           fix=f"narrow the pattern, or pass a list of layer names such as {find_lora_targets(model)}")
    return LoraPlan([pattern], settings, _lora_config(model, settings, pattern), False,
                    f" (pattern: {len(matched)} modules)")


def _lora_config(model, settings: LoraSettings, targets):
    """peft's LoraConfig for checked targets (names or a pattern), marked as written for this model's own module
    names: peft never renames them."""
    from peft import LoraConfig

    try:
        config = LoraConfig(r=settings.r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                            bias=settings.bias, target_modules=targets, task_type=peft_task_type(model),
                            **settings.extra)
    except (TypeError, ValueError) as e:  # an unknown field, or fields peft finds inconsistent
        raise AdapterError("Building the LoRA config", found=str(e),
                           fix="pass only peft.LoraConfig fields in lora=, with values peft accepts together") from e
    keep_targets_as_written()
    mark_built_for_the_model(config)
    return config


def _peft_adaptable(module) -> bool:
    """The layer types peft's LoRA adapts (its dispatchers): linear ones (quantized too), embeddings, convolutions
    (transformers' Conv1D included) and multi-head attention."""
    from transformers.pytorch_utils import Conv1D

    return is_linear(module) or isinstance(module, (torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d,
                                                    torch.nn.Conv3d, torch.nn.MultiheadAttention, Conv1D))


def inject_lora(model, plan: LoraPlan, sharing: bool = False, phase_name: str | None = "lora_peft"):
    """peft's injection of the planned adapters (built empty where apply_lora fills them). `sharing`: another thread
    (the draws, the readers) needs the interpreter meanwhile (adapter_draws.sharing_the_interpreter). `phase_name`:
    None records no phase (the caller times it)."""
    from peft import get_peft_model

    from fastload._log import quiet_foreign_deprecations
    from fastload.load.global_patches import PATCHING_GLOBALS
    from fastload.load.memory import skipped_init

    # built empty to be filled here: peft's init draws on meta tensors, a reference kernel per call, are skipped
    with PATCHING_GLOBALS, quiet_foreign_deprecations(), \
            skipped_init() if plan.fill_here else contextlib.nullcontext(), \
            sharing_the_interpreter() if sharing else contextlib.nullcontext(), mapping_not_needed(plan.config):
        # peft's injection, split off the load's "lora" phase (or on its own while the weights are read)
        with phase(phase_name, within="lora") if phase_name else contextlib.nullcontext():
            try:
                return get_peft_model(model, plan.config, autocast_adapter_dtype=True,
                                      low_cpu_mem_usage=plan.fill_here)
            except ValueError as e:  # peft's own refusals (a layer type or an option it cannot adapt)
                raise AdapterError(f"Adding LoRA on {plan.targets} to {type(model).__name__}", found=str(e),
                                   fix="change target_modules or the LoRA option peft names, then load the model "
                                       "again (peft may have wrapped some layers before it refused)") from e


def apply_lora(model, settings: LoraSettings, random_state: int | None = None, early: EarlyDraws | None = None,
               injected=None):
    """Wrap the model with peft LoRA adapters; only the adapters train, kept in fp32; nothing else is upcast.
    `early`: the draws the load started beside its reading (fastload.train.adapter_draws.EarlyDraws), if any.
    `injected`: the injection the load already made on its skeleton (fastload.train.early_injection), if any."""
    from fastload.load.global_patches import PATCHING_GLOBALS

    with PATCHING_GLOBALS:  # the default dtype and register_parameter must not be another load's meanwhile
        return _apply_lora(model, settings, random_state, early, injected)


def _apply_lora(model, settings: LoraSettings, random_state, early, injected):
    done = injected.take(model) if injected is not None else None
    if done is not None:
        plan, peft_model, predicted = done
    else:
        plan, peft_model = plan_lora(model, settings), None
        predicted = (predicted_adapters(model, plan.targets, plan.config.r, plan.config.exclude_modules)
                     if plan.fill_here else None)
    if random_state is not None:
        torch.manual_seed(random_state)
    draws = None
    if plan.fill_here:
        draws = (early.for_adapters(predicted) if early is not None else None) or AdapterDraws(predicted)
    if peft_model is None:
        peft_model = inject_lora(model, plan, sharing=draws is not None)
    if plan.fill_here:
        _fill_like_peft(peft_model, draws)
    trainable, total = _train_in_fp32(peft_model)  # a classifier's head (modules_to_save) trains in fp32 too
    if plan.config.task_type == "SEQ_CLS":
        from fastload.load.task import head_in_full_precision

        head_in_full_precision(peft_model)
    logger.info("LoRA r=%s alpha=%s on %s%s: %s trainable parameters (%.2f%% of %s)", plan.settings.r,
                plan.settings.lora_alpha, ",".join(plan.targets), plan.notes, f"{trainable:,}",
                100 * trainable / max(total, 1), f"{total:,}")
    _warn_rank_past_widths(peft_model, plan.settings.r)
    return peft_model


def _warn_rank_past_widths(peft_model, r) -> None:
    """A rank at least as wide as every adapted layer's narrower side adds adapters no lower-rank than the layers
    themselves (r=4096 on a 64-wide model trained 99% of its parameters), which peft accepts without a word."""
    if not isinstance(r, int):
        return
    widths = [min(m.in_features, m.out_features) for n, m in peft_model.named_modules()
              if n.endswith(".base_layer") and hasattr(m, "in_features") and hasattr(m, "out_features")]
    if widths and r >= max(widths):
        logger.warning("LoRA r=%d is at least the narrower side of every adapted layer (at most %d): the adapters are "
                       "no lower-rank than the layers they adapt; a rank well below %d is what LoRA is for",
                       r, max(widths), min(widths))


def _left_alone_note(left: dict[str, str]) -> str:
    """The words the LoRA log line adds for a family's layers the default targets skip ("" when none)."""
    return "".join(f" ({name} left alone: {why})" for name, why in sorted(left.items()))


# LoraConfig fields that change neither which adapters peft builds nor their init: any other field must keep peft's
# default for the adapters to be built empty and filled here (an allowlist: peft adds fields every release, e.g.
# ensure_weight_tying and trainable_token_indices build adapters _fill_like_peft knows nothing of)
FILLABLE_FIELDS = {"r", "lora_alpha", "lora_dropout", "bias", "target_modules", "exclude_modules", "use_rslora",
                   "layers_to_transform", "layers_pattern", "task_type", "inference_mode", "peft_type", "peft_version",
                   "base_model_name_or_path", "revision", "auto_mapping", "init_lora_weights"}


def _default_init(config) -> bool:
    """Whether peft's plain LoRA init (nn.Linear's kaiming draws for A and B, then A drawn again, B zeroed) is all
    the adapters need: then they are built empty and filled by _fill_like_peft."""
    from peft import LoraConfig

    if torch.get_default_device().type != "cpu":  # peft draws from the generator of the device it builds on
        return False
    if config.init_lora_weights is not True or config.task_type != "CAUSAL_LM":
        return False
    defaults, given = LoraConfig().to_dict(), config.to_dict()
    return all(given.get(key) == value for key, value in defaults.items() if key not in FILLABLE_FIELDS)


def _fill_like_peft(peft_model, draws: AdapterDraws | None = None) -> None:
    """Give the empty (meta) adapters exactly the values peft's default init would: the same draws from the same
    generator state in the same module order, the draws peft throws away included, and leave the global generator
    where peft would. Why: peft allocates and initialises every adapter on the CPU one at a time, then copies it to
    the base layer's device (~1 s for an 8B model's 224 layers); here only the kept A is copied, B is zeroed there.
    `draws` made them on a thread meanwhile (fastload.train.adapter_draws); used when they are for these adapters."""
    wrappers = [m for m in peft_model.modules()  # a dict lookup: getattr's miss raises inside nn.Module per module
                if isinstance(m._modules.get("lora_A"), torch.nn.ModuleDict) and "default" in m._modules["lora_A"]]
    built = [(tuple(w.lora_A["default"].weight.shape), tuple(w.lora_B["default"].weight.shape),
              w.get_base_layer().weight.device) for w in wrappers]
    with phase("lora_draws_wait", within="lora"):  # waiting for the draws made on their thread
        ready = draws.result(built) if draws is not None else None
    kept_values, end_state = ready if ready is not None else draw_like_peft(built, torch.get_rng_state())
    for i, (wrapper, (_, b_shape, device)) in enumerate(zip(wrappers, built)):
        kept, kept_values[i] = kept_values[i], None  # one A at a time in two forms (a cast copies it), not all of them
        lora_a, lora_b = wrapper.lora_A["default"], wrapper.lora_B["default"]
        trains = lora_a.weight.requires_grad
        lora_a.weight = torch.nn.Parameter(_as_peft_casts(kept, wrapper), requires_grad=trains)
        lora_b.weight = torch.nn.Parameter(torch.zeros(b_shape, device=device), requires_grad=trains)
    torch.set_rng_state(end_state)
    left = [name for name, p in peft_model.named_parameters() if p.device.type == "meta"]
    if left:  # peft built something this fill does not know: never hand out a model that cannot run
        raise AdapterError("Adding LoRA", found=f"{len(left)} adapter parameter(s) peft built were left unfilled "
                                                f"({left[:3]})",
                           fix="report this with your LoRA options; meanwhile pass init_lora_weights='gaussian' to "
                               "have peft initialise the adapters itself")


def _as_peft_casts(kept: torch.Tensor, wrapper) -> torch.Tensor:
    """A's drawn fp32 values as peft leaves them: moved to the base layer's dtype where that is a float (from peft
    0.21.2 on, a 4-bit layer's compute dtype: bf16-rounded values), then back to fp32 (autocast_adapter_dtype)."""
    base = wrapper.get_base_layer()
    find = getattr(wrapper, "_get_base_layer_device_and_dtype", None)
    dtype = find(base)[1] if find is not None else getattr(getattr(base, "weight", None), "dtype", None)
    if dtype is None or not dtype.is_floating_point or dtype == kept.dtype:
        return kept
    return kept.to(dtype).float() if dtype in (torch.float16, torch.bfloat16) else kept.to(dtype)


def _train_in_fp32(peft_model) -> tuple[int, int]:
    """Upcast every trainable parameter (a classifier's head in modules_to_save too) to fp32 and count them.

    One walk over the parameters does both: each walk of an 8B model's 224 adapted layers costs milliseconds.

    Returns:
        (trainable elements, all elements).
    """
    trainable = total = 0
    for p in peft_model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            if p.dtype != torch.float32:
                p.data = p.data.float()
    return trainable, total


def peft_task_type(model) -> str:
    """peft's task type for the model's head: SEQ_CLS puts the classifier's head in modules_to_save (trained)."""
    from fastload.load.task import CAUSAL_LM, PEFT_TASK_TYPES

    return PEFT_TASK_TYPES[state_of(model, create=False).task or CAUSAL_LM]


def lora_settings_of(model) -> dict[str, Any]:
    cfg = getattr(model, "peft_config", {}).get("default")
    return cfg.to_dict() if cfg is not None else {}
