"""FSDP2-QLoRA: a fastload model prepared so that PyTorch's FSDP2 (through accelerate / transformers' Trainer) can
shard it.

FSDP shards every parameter of a wrapped layer alike, so three things must hold, and fastload sets them at load:
the packed 4-bit weights are stored in the compute dtype (bnb_4bit_quant_storage; as uint8 they could not share a
layer's shards with the 16-bit norms), the LoRA matrices are in that same dtype (fastload keeps them in fp32 outside
FSDP), and activation checkpointing is FSDP's own wrapper (transformers' checkpointing on top of it would all-gather
each layer twice). The engine's levers replace layer functions FSDP's hooks wrap; they stay off unless asked.
"""

from __future__ import annotations

from typing import Any

from fastload._log import logger
from fastload.model_state import state_of

CHECKPOINT_WRAPPER_PREFIX = "_checkpoint_wrapped_module."  # torch's checkpoint_wrapper inserts it in every name


def compute_dtype_name(dtype: Any, device_map: Any) -> str:
    """The dtype the model will compute in (as from_pretrained chooses it), as a QuantSettings storage name."""
    from fastload.load.devices import (
        choose_compute_dtype,
        main_device,
        resolve_device_map,
    )
    from fastload.settings import dtype_name

    asked = dtype_name(dtype, "dtype")
    if asked:
        return asked
    return str(choose_compute_dtype(main_device(resolve_device_map(device_map)))).replace("torch.", "")


def fsdp_load_options(quant_options: dict, quantization_config: Any, dtype: Any, device_map: Any,
                      engine: Any) -> tuple[dict, Any]:
    """from_pretrained's quantization options and engine setting for an FSDP load.

    Args:
        quant_options: the BitsAndBytesConfig fields given as keywords.
        quantization_config: a user's BitsAndBytesConfig (its storage must then already be the compute dtype).
        dtype: the asked compute dtype, or None.
        device_map: this rank's device map.
        engine: the asked engine setting (True: the default, turned off here, logged).
    Returns:
        (quant_options with bnb_4bit_quant_storage, engine setting).
    Raises:
        InvalidOption: a storage dtype other than the compute dtype, or 4-bit experts, was asked for.
    """
    from fastload.distributed import check_fsdp_storage
    from fastload.errors import InvalidOption

    compute = compute_dtype_name(dtype, device_map)
    options = dict(quant_options)
    if quantization_config is not None:
        config = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
        check_fsdp_storage(str(config.get("bnb_4bit_quant_storage", "uint8")).replace("torch.", ""), compute)
    elif options.get("bnb_4bit_quant_storage") is not None:
        check_fsdp_storage(str(options["bnb_4bit_quant_storage"]).replace("torch.", ""), compute)
    else:
        options["bnb_4bit_quant_storage"] = compute
        logger.info("FSDP: 4-bit weights stored as %s (bnb_4bit_quant_storage), so FSDP can shard them", compute)
    if options.get("quantize_experts") is True:  # asked for: FSDP shards plain tensors; a packed stack is not one
        raise InvalidOption("quantize_experts=True under FSDP", found="FSDP shards plain tensors, and a 4-bit expert "
                            "stack is packed bytes with its statistics",
                            fix="leave quantize_experts unset (or False) under FSDP: the experts stay in the compute "
                                "dtype")
    if options.setdefault("quantize_experts", False) is False:
        logger.info("FSDP: MoE experts, if any, stay in the compute dtype (FSDP shards them as they are)")
    if engine is True:
        logger.info("FSDP: the engine's levers stay off (they replace layer functions FSDP wraps; engine={...} "
                    "turns one on)")
        engine = False
    return options, engine


def prepare_for_fsdp(model, checkpointing: bool) -> None:
    """LoRA (and any trainable) parameters in the model's compute dtype, and the wish for FSDP's activation
    checkpointing recorded for training_arguments (model.fastload.fsdp)."""
    import torch

    from fastload.train.trainer import compute_dtype_of

    dtype = compute_dtype_of(model) or torch.float32
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)
            cast += 1
    if cast:
        logger.info("FSDP: %d trainable tensors in %s (FSDP shards a layer's parameters in one dtype)", cast,
                    str(dtype).replace("torch.", ""))
    state_of(model).fsdp = {"activation_checkpointing": checkpointing}


def layer_class_names(model) -> list[str]:
    """The decoder layer class(es) FSDP wraps one by one (each an all-gather unit, and a checkpointed unit)."""
    from fastload.structure import decoder_layers
    from fastload.train.checkpointing import _base

    layers = decoder_layers(_base(model)) or []
    return sorted({type(layer).__name__ for layer in layers})


def fsdp_arguments(model) -> dict:
    """TrainingArguments fields that run this model under FSDP2: full sharding per decoder layer, FSDP's own
    activation checkpointing, a full (gathered) state dict so rank 0 saves a whole adapter."""
    from fastload.distributed import current_launch

    wish = state_of(model, create=False).fsdp
    if wish is None or current_launch() is None:  # one process: nothing to shard (transformers refuses FSDP then)
        return {}
    config = {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
              "transformer_layer_cls_to_wrap": layer_class_names(model),
              "activation_checkpointing": wish["activation_checkpointing"], "state_dict_type": "FULL_STATE_DICT",
              "reshard_after_forward": True}
    # torch's AdamW: FSDP2 turns the parameters into DTensors, which bitsandbytes' 8-bit state does not shard;
    # the fp32 state of LoRA matrices is small, and sharded with them
    return {"fsdp": "full_shard auto_wrap", "fsdp_config": config, "gradient_checkpointing": False,
            "optim": "adamw_torch"}


def is_sharded(model) -> bool:
    """Whether FSDP2 has sharded this model (its parameters are DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model) -> dict | None:
    """The trainable tensors (the adapter) of an FSDP2-sharded model, each gathered whole onto the CPU, under the
    model's parameter names; None for a model FSDP did not shard. A collective: every rank calls it, in the same
    order. Only the adapter is gathered: the whole state dict would bring the full 4-bit base to every rank's host."""
    if not is_sharded(model):
        return None
    from torch.distributed.tensor import DTensor

    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            whole = p.full_tensor() if isinstance(p, DTensor) else p
            state[name] = whole.detach().cpu()
    return state


def save_gathered_adapter(model, directory, state: dict, save_embedding_layers: bool | str = "auto") -> None:
    """Write the adapter from full_state_dict's tensors as peft's save_pretrained lays it out. peft picks an
    adapter's tensors by its layers' module names: up to 0.21 with the checkpoint wrapper's part in them, from 0.22
    without, so each tensor is offered under both names (each version matches one). A selection that finds no
    adapter tensor is an error, never an empty adapter file."""
    import copy
    from pathlib import Path

    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    adapter = getattr(model, "active_adapter", "default")
    offered = {**state, **{name.replace(CHECKPOINT_WRAPPER_PREFIX, ""): t for name, t in state.items()}}
    weights = {name.replace(CHECKPOINT_WRAPPER_PREFIX, ""): t.contiguous() for name, t in
               get_peft_model_state_dict(model, state_dict=offered, adapter_name=adapter,
                                         save_embedding_layers=save_embedding_layers).items()}
    if not weights:
        import peft

        from fastload.errors import AdapterError

        raise AdapterError(f"Saving the FSDP-sharded adapter '{adapter}': peft {peft.__version__} selected none of the "
                           f"{len(state)} gathered trainable tensors (e.g. {next(iter(state), 'none')}) as the "
                           "adapter's, so nothing was written. Report this with your peft version.")
    save_file(weights, str(Path(directory) / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.peft_config[adapter])
    config.inference_mode = True
    config.save_pretrained(str(directory))


def shard(model, checkpointing: bool | None = None):
    """Shard a model loaded with fsdp=True with PyTorch's FSDP2, as accelerate does for the Trainer: FSDP's
    activation checkpointing around each decoder layer, each layer its own all-gather unit, then the root.

    For a training loop of your own under torchrun (the Trainer shards by itself, from training_arguments' fields).

    Args:
        model: the (peft) model from FastModel.from_pretrained(..., fsdp=True) in a launched process.
        checkpointing: FSDP's activation checkpointing; None: as asked at load (gradient_checkpointing).
    Returns:
        The same model, sharded in place (its parameters are DTensors now).
    Raises:
        InvalidOption: the model was not loaded with fsdp=True, or this process is not part of a launch.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )
    from torch.distributed.fsdp import fully_shard

    from fastload.distributed import launched
    from fastload.errors import InvalidOption
    from fastload.structure import decoder_layers
    from fastload.train.checkpointing import _base

    wish = state_of(model, create=False).fsdp
    if wish is None or launched() is None:
        raise InvalidOption("Sharding the model with FSDP", found="it was not loaded with fsdp=True" if wish is None
                            else "this process is not part of a torchrun / accelerate launch",
                            fix="launch with torchrun --nproc-per-node N and load with "
                                "FastModel.from_pretrained(..., fsdp=True)")
    layers = list(decoder_layers(_base(model)) or [])
    if wish["activation_checkpointing"] if checkpointing is None else checkpointing:
        kinds = tuple({type(layer) for layer in layers})
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, kinds))
        layers = list(decoder_layers(_base(model)) or [])  # each now inside its checkpoint wrapper
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    logger.info("FSDP2: %d decoder layers sharded over the launch's ranks", len(layers))
    return model
