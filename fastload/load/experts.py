"""The fused 3-D expert weights of transformers 5's mixture-of-experts models (Mixtral, Qwen3-MoE, gpt-oss):
bitsandbytes quantizes Linear layers only, so a 4-bit load leaves them in the compute dtype; fastload then stores them
4-bit itself (fastload.load.nf4_experts), with the model's own quant type and double-quant choice, unless asked not
to (quantize_experts=False).

Each weight is quantized as transformers puts it into its experts module (a parameter-registration hook around
from_pretrained), so the load never holds more than one 16-bit expert weight (verified on transformers 5.24; on 5.17
the load still peaks with them all 16-bit); a load that writes a store entry quantizes them after the entry is staged
instead, so that the store keeps the checkpoint's 16-bit experts and every load quantizes the same values (a few
milliseconds per layer on a GPU). A background store write holds the staged 16-bit experts until it has written
them: during the first steps after such a load, they sit beside the 4-bit stacks. Experts loaded any other way
(fastload's direct load) are quantized right after the load.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from fastload._log import logger
from fastload.load.nf4_experts import is_stack, quantize_stack
from fastload.structure import decoder_layers, router_widths


def expert_weights(layers, config) -> list:
    """The fused expert weights in decoder layers: 3-D floating-point parameters whose first axis counts the experts
    (a vision tower's 3-D probe or a convolution is not one), 4-bit stacks included."""
    return [module._parameters[name] for module, name in expert_slots(layers, config)]


def expert_slots(layers, config) -> list[tuple]:
    """(module, parameter name) of every fused expert weight in `layers` (names, not tensors: a caller replacing
    them one by one frees each 16-bit weight as it goes)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    experts = router_widths(text)
    return [(module, name) for layer in layers for module in layer.modules()
            for name, p in module.named_parameters(recurse=False)
            if p.ndim == 3 and p.is_floating_point() and p.shape[0] in experts]


def _model_slots(model) -> list[tuple]:
    return expert_slots(decoder_layers(model) or [], model.config)


def _stacks(model) -> list:
    return [m._parameters[n] for m, n in _model_slots(model) if is_stack(m._parameters[n])]


def unquantized_expert_share(model) -> tuple[int, int]:
    """(elements in fused expert weights left in 16/32-bit, elements in all parameters) of a loaded model."""
    experts = sum(m._parameters[n].numel() for m, n in _model_slots(model) if not is_stack(m._parameters[n]))
    return experts, sum(p.numel() for p in model.parameters())


def four_bit_settings(model) -> tuple[str, bool] | None:
    """(quant type, double quant) of a model loaded in bitsandbytes 4-bit, from its BitsAndBytesConfig; else None."""
    return four_bit_settings_of(getattr(model.config, "quantization_config", None))


def four_bit_settings_of(config) -> tuple[str, bool] | None:
    """(quant type, double quant) of a BitsAndBytesConfig (or its dict) that loads 4-bit; else None."""
    if config is None:
        return None
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if not config.get("load_in_4bit"):
        return None
    return config.get("bnb_4bit_quant_type", "nf4"), bool(config.get("bnb_4bit_use_double_quant", False))


def quantize_experts(model) -> int:
    """Store every fused expert weight of a 4-bit model as an NF4ExpertStack (the model's quant type and double
    quant, bitsandbytes' block of 64), one weight at a time so that only one 16-bit stack is ever added.

    Args:
        model: a model loaded in bitsandbytes 4-bit, before LoRA.

    Returns:
        How many weights were quantized (0 for a dense model, an 8-bit or 16-bit one, or one already done).
    """
    settings = four_bit_settings(model)
    if settings is None:
        return 0
    quant_type, double_quant = settings
    done = 0
    for module, name in _model_slots(model):
        if is_stack(module._parameters[name]):
            continue
        with torch.no_grad():
            stack = quantize_stack(module._parameters[name].data, quant_type, double_quant)
        module._parameters[name] = torch.nn.Parameter(stack, requires_grad=False)
        done += 1
    return done


def arrival_settings(plan, config) -> tuple[str, bool] | None:
    """(quant type, double quant) to store a load's experts with as they are read, or None: not a 4-bit load,
    quantize_experts=False, or a load that writes a store entry (the store keeps the checkpoint's 16-bit experts)."""
    if not plan.quant.quantize_experts or (plan.store_key and not plan.prequantized):
        return None
    if plan.prequantized:
        return four_bit_settings_of(getattr(config, "quantization_config", None))
    q = plan.quant
    return (q.bnb_4bit_quant_type, bool(q.bnb_4bit_use_double_quant)) if q.load_in_4bit else None


@contextlib.contextmanager
def quantized_on_arrival(settings: tuple[str, bool] | None):
    """Within the block, each fused expert weight registered on an experts module (a module whose `num_experts`
    counts the weight's first axis), as transformers' from_pretrained does once the weight is read, is stored as an
    NF4ExpertStack with `settings` (quant type, double quant) instead; None: nothing changes. Only registrations made
    on the calling thread count (such a load reads in turn, on its own thread: fastload.load.reads_in_turn)."""
    if settings is None:
        yield
        return

    loading_thread = threading.get_ident()  # the hook is process-wide: another thread's load is not this one's

    def hook(module, name, param):
        if (threading.get_ident() != loading_thread or param is None or is_stack(param) or param.ndim != 3
                or not param.is_floating_point() or param.is_meta
                or getattr(module, "num_experts", None) != param.shape[0]):
            return None
        with torch.no_grad():
            stack = torch.nn.Parameter(quantize_stack(param.detach(), *settings), requires_grad=False)
        # what the loader marks on the weight (transformers' _is_hf_initialized: not to be initialized again)
        stack.__dict__.update({k: v for k, v in vars(param).items() if k != "_is_param"})
        return stack

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def settle_experts(model, quantize: bool, dtype) -> None:
    """At load: store the experts 4-bit when the model is 4-bit and `quantize` (the quantize_experts option) holds
    (those quantized on arrival are already), and say in one line what the experts are now."""
    if not _model_slots(model):
        return
    if quantize:
        quantize_experts(model)
    stacks = _stacks(model)
    if stacks:
        logger.info("the experts' fused 3-D weights (%s elements) are stored 4-bit too (%s, %.1f MiB); "
                    "quantize_experts=False keeps them in %s", f"{sum(p.numel() for p in stacks):,}",
                    stacks[0].form.quant_type, sum(p.packed_bytes() for p in stacks) / 2**20,
                    str(dtype).replace("torch.", ""))
    note_unquantized_experts(model, four_bit_settings(model) is not None or _is_8bit(model), dtype, quantize)


def _is_8bit(model) -> bool:
    config = getattr(model.config, "quantization_config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    return bool(config.get("load_in_8bit"))


def note_unquantized_experts(model, quantized: bool, dtype, asked: bool = True) -> None:
    """Say once, at load, when a quantized load keeps expert weights in 16/32-bit: memory is not what 4-bit implies."""
    if not quantized:
        return
    experts, total = unquantized_expert_share(model)
    if experts:
        why = ("quantize_experts=False was asked" if not asked and four_bit_settings(model) is not None
               else "bitsandbytes' 8-bit quantizes Linear layers only")
        logger.warning("the experts' fused 3-D weights (%s elements, %.0f%% of the stored ones) stay in %s: %s",
                       f"{experts:,}", 100 * experts / max(total, 1), str(dtype).replace("torch.", ""), why)


@contextlib.contextmanager
def experts_in_16bit(model, device=None):
    """Within the block, every 4-bit expert stack is a plain parameter of its dequantized values (on `device`, default
    its own), for writers that need real tensors (transformers' save_pretrained); 4-bit again after."""
    swapped = []
    try:  # a failure part-way (out of memory) puts back the stacks already swapped
        for module, name in _model_slots(model):
            weight = module._parameters[name]
            if is_stack(weight):
                dense = weight.dequantize().to(device or weight.device)
                module._parameters[name] = torch.nn.Parameter(dense, requires_grad=False)
                swapped.append((module, name, weight))
        yield len(swapped)
    finally:
        for module, name, weight in swapped:
            module._parameters[name] = weight
