"""Trainers for the loaded model: transformers' Trainer or TRL's SFTTrainer, with fastload's defaults.

The model from FastModel.from_pretrained goes into either trainer unchanged. What fastload adds is defaults
(8-bit AdamW, LoRA learning rate, non-reentrant checkpointing, max_seq_length as SFT truncation, the device's
precision) and a guard that keeps gradient checkpointing working whatever the trainer's own settings do.

A Trainer built by hand works too; give it `optimizers=(FastModel.get_optimizer(model), None)` (fastload's
AdamW8bit, with lean steps) or `optim="adamw_8bit"` in its TrainingArguments (transformers' bitsandbytes AdamW),
else transformers picks its 32-bit fused AdamW.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from typing import Any

import torch

from fastload._log import logger
from fastload.errors import BackendUnavailable, InvalidOption
from fastload.train.checkpointing import (
    CheckpointingGuard,
    checkpointing_guard,
    for_training,
    is_checkpointing,
)
from fastload.train.optim import DEFAULT_LR, DEFAULT_WEIGHT_DECAY, TRAINER_OPTIM

# fastload's training defaults, written once; anything given to training_arguments(...) wins.
TRAINING_DEFAULTS: dict[str, Any] = {
    "optim": TRAINER_OPTIM,                       # bitsandbytes AdamW with 8-bit state
    "learning_rate": DEFAULT_LR,                  # LoRA trains well at 2e-4 (10x a full fine-tune's rate)
    "weight_decay": DEFAULT_WEIGHT_DECAY,
    "gradient_checkpointing": True,
    "gradient_checkpointing_kwargs": {"use_reentrant": False},  # reentrant drops LoRA grads behind frozen inputs
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 4,
    "logging_steps": 1,
    "report_to": "none",
}
DEFAULT_OUTPUT_DIR = "outputs"


def import_trl():
    """TRL is an optional extra: import it only when SFT is asked for, and say how to get it."""
    try:
        import trl
    except ImportError as e:
        raise BackendUnavailable("SFT training (sft=True) was asked for", found=f"TRL is not installed ({e})",
                                 fix="pip install 'fastload[trl]' (or pip install trl), or use sft=False for "
                                     "transformers' Trainer with fastload's data helpers") from e
    return trl


def compute_dtype_of(model):
    """The dtype the model computes in: its 4-bit layers' compute dtype, else its parameters' dtype."""
    from fastload.structure import is_linear4bit

    for module in model.modules():
        dtype = getattr(module, "compute_dtype", None)
        if is_linear4bit(module) and dtype is not None:
            return dtype
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return getattr(base, "dtype", None)


def precision_flags(model=None) -> dict[str, bool]:
    """bf16/fp16 mixed precision matching the model's compute dtype (or the device's when no model is given).

    fp32 on a CPU without native bf16 (emulated bf16 autocast is ~35x slower there); fp16 only on a GPU. bf16 on a
    CPU with native bf16 needs use_cpu=True, without which transformers refuses bf16 where it sees no GPU.
    """

    from fastload.load.devices import choose_compute_dtype

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = compute_dtype_of(model) if model is not None else choose_compute_dtype(device)
    flags = {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16 and device == "cuda"}
    if flags["bf16"] and device == "cpu":
        flags["use_cpu"] = True
    return flags


def arguments_class(sft: bool):
    if sft:
        return import_trl().SFTConfig
    from transformers import TrainingArguments

    return TrainingArguments


def training_arguments(output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR, sft: bool = False, model=None,
                       **kwargs: Any):
    """TrainingArguments (or TRL SFTConfig when sft=True) with fastload's defaults; any field may be overridden.

    With `model`, SFT truncation (max_length) is the model's max_seq_length and the precision follows its compute
    dtype; without, the device decides the precision and TRL's max_length stays.
    """
    cls = arguments_class(sft)
    options = {**copy.deepcopy(TRAINING_DEFAULTS), **precision_flags(model), **launch_defaults(model),
               **loader_flags()}
    if sft and getattr(model, "max_seq_length", None):
        options["max_length"] = model.max_seq_length
    options.update(kwargs)
    gc_kwargs = options.get("gradient_checkpointing_kwargs")
    if options.get("gradient_checkpointing") and isinstance(gc_kwargs, dict) and "use_reentrant" not in gc_kwargs:
        options["gradient_checkpointing_kwargs"] = {**gc_kwargs, "use_reentrant": False}
    options = current_checkpointing_names(cls, options)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InvalidOption(f"training_arguments({', '.join(f'{k}=...' for k in unknown)})",
                            found=f"not field(s) of {cls.__name__}",
                            fix=f"use {cls.__name__} field names (see its documentation); SFT-only fields such as "
                                "max_length need sft=True")
    return cls(output_dir=str(output_dir), **options)


PRETRAIN_ONLY = ("train_embeddings", "embedding_learning_rate", "new_tokens")


def _refuse_unknown_keywords(trainer_kwargs: dict, sft: bool) -> None:
    """A keyword neither the arguments nor the trainer take, said as fastload's error before anything is built
    (the trainer's own TypeError names neither where it came from nor what to use)."""
    import inspect

    if sft:
        cls = import_trl().SFTTrainer
    else:
        from transformers import Trainer as cls
    accepted = set()
    for klass in cls.__mro__:  # a subclass taking **kwargs (fastload's Unsloth-compatible SFTTrainer) passes them on
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        accepted |= set(params) | set(klass.__dict__.get("EXTRA_KEYWORDS", ()))  # what **kwargs itself takes
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    else:
        return  # every __init__ takes any keyword: nothing to check against
    unknown = sorted(set(trainer_kwargs) - accepted)
    if not unknown:
        return
    pretrain = [k for k in unknown if k in PRETRAIN_ONLY]
    raise InvalidOption(f"get_trainer({', '.join(f'{k}=...' for k in unknown)})",
                        found=f"not a field of the training arguments nor a parameter of {cls.__name__}",
                        fix=(f"{', '.join(pretrain)} belong to continued pretraining: pass method='pretrain'"
                             if pretrain else "check the spelling against the trainer's arguments and "
                             f"{cls.__name__}'s parameters"))


def launch_defaults(model=None) -> dict[str, Any]:
    """Fields for a run under torchrun / accelerate launch: FSDP's for a model loaded with fsdp=True
    (fastload.train.fsdp); else DDP without the search for unused parameters (every LoRA matrix gets a gradient;
    the search costs a pass over the graph each step)."""
    from fastload.distributed import current_launch
    from fastload.train.fsdp import fsdp_arguments

    options = fsdp_arguments(model) if model is not None else {}
    if current_launch() is None:
        return options

    if options and not torch.cuda.is_available():
        logger.warning("FSDP: transformers' Trainer shards only on GPUs; these CPU processes train data-parallel "
                       "(DDP) instead (fastload.train.fsdp.shard(model) shards for a training loop of your own)")
        options = {}
    if not options:
        options["ddp_find_unused_parameters"] = False

    if not torch.cuda.is_available():  # transformers treats CPU processes as one launch only with use_cpu
        options.update(use_cpu=True, ddp_backend="gloo")
    return options


def loader_flags() -> dict[str, bool]:
    """Pinned batches only speed up copies to a GPU; on the CPU torch warns that it cannot pin them."""

    return {} if torch.cuda.is_available() else {"dataloader_pin_memory": False}


# transformers 5.2x's names for the checkpointing options (the old ones warn that they are deprecated): old, new
CHECKPOINTING_RENAMES = (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"))


def current_checkpointing_names(cls, options: dict) -> dict:
    """gradient_checkpointing(_kwargs) as activation_checkpointing(_kwargs) where the arguments class has those
    (transformers 5.2x; the old names then warn that they are deprecated). The old names stay readable on the
    result: transformers mirrors them."""
    fields = {f.name for f in dataclasses.fields(cls)}
    renamed = dict(options)
    for old, new in CHECKPOINTING_RENAMES:
        if new in fields and old in renamed:
            value = renamed.pop(old)
            renamed.setdefault(new, value)
    return renamed


def adopt_checkpointing_names(args) -> None:
    """Before transformers' __post_init__: gradient_checkpointing(_kwargs) taken under the current names where
    those are unset. TRL sets gradient_checkpointing=True on every config, so its default alone would tell the user
    that a name they never wrote is deprecated; the old names stay readable (transformers mirrors them)."""
    fields = {f.name for f in dataclasses.fields(args)}
    for old, new in CHECKPOINTING_RENAMES:
        if new in fields and getattr(args, new) is None and getattr(args, old) is not None:
            setattr(args, new, getattr(args, old))


def default_optim() -> str:
    """TrainingArguments' own optim default: seeing it means the user did not choose an optimizer."""
    from transformers import TrainingArguments

    field = next(f for f in dataclasses.fields(TrainingArguments) if f.name == "optim")
    return _name(field.default)


def _fastload_optimizer_serves(args) -> bool:
    """fastload's AdamW8bit (bitsandbytes' with lean steps, grouped and configured as transformers' adamw_8bit)
    where the user left the optimizer to the defaults: transformers' own, or "adamw_8bit" without optim_args."""
    name = _name(args.optim)
    return name == default_optim() or (name == TRAINER_OPTIM and not getattr(args, "optim_args", None))


def _name(optim) -> str:
    return str(getattr(optim, "value", optim))


def _as_sft_config(args):
    """A plain TrainingArguments given with sft=True becomes an SFTConfig carrying the same settings."""
    trl = import_trl()
    if isinstance(args, trl.SFTConfig):
        return args
    values = args.to_dict()
    values["hub_token"] = args.hub_token  # to_dict hides it
    return trl.SFTConfig(**values)


def _sft_default_max_length() -> int | None:
    trl = import_trl()
    return next(f for f in dataclasses.fields(trl.SFTConfig) if f.name == "max_length").default


def _normalize_args(args, model, sft: bool):
    if sft:
        args = _as_sft_config(args)
        limit = getattr(model, "max_seq_length", None)
        if limit and args.max_length == _sft_default_max_length() and args.max_length != limit:
            logger.info("SFT max_length: %s, the model's max_seq_length (SFTConfig's default was %s)", limit,
                        args.max_length)
            args.max_length = limit
        elif limit and args.max_length and args.max_length > limit:
            logger.warning("SFT max_length=%s is beyond the model's max_seq_length=%s", args.max_length, limit)
    if args.ddp_find_unused_parameters is None and "ddp_find_unused_parameters" in launch_defaults(model):
        args.ddp_find_unused_parameters = False
    if args.gradient_checkpointing:
        kw = dict(args.gradient_checkpointing_kwargs or {})
        if "use_reentrant" not in kw:
            kw["use_reentrant"] = False
            args.gradient_checkpointing_kwargs = kw
    return args


def _prepare_dataset(dataset, tokenizer, max_length, sft: bool, responses_only: bool):
    """Raw records (lists of dicts of a common shape) -> tokenized examples with responses-only labels.

    Datasets that already have input_ids pass unchanged; for SFT, a datasets.Dataset of TRL's own formats
    (messages, text, prompt/completion) also passes unchanged, and TRL tokenizes it.
    """
    from fastload.data import prepare_records

    if dataset is None:
        return None
    columns = _columns(dataset)
    tokenize = "input_ids" not in columns and not (sft and not isinstance(dataset, list))
    if tokenize:
        dataset = prepare_records(dataset, tokenizer, max_length, responses_only)
    if sft and isinstance(dataset, list):
        from datasets import Dataset

        dataset = Dataset.from_list(dataset)
    return dataset


def _columns(dataset) -> set[str]:
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return set(names)
    try:
        first = dataset[0]
    except (IndexError, KeyError, TypeError):
        return set()
    return set(first) if isinstance(first, dict) else set()


def get_trainer(model, tokenizer, train_dataset, args=None, sft: bool = False, eval_dataset=None,
                data_collator=None, responses_only: bool = True, **trainer_kwargs: Any):
    """Build transformers' Trainer (or TRL's SFTTrainer with sft=True) around the loaded model.

    train_dataset: tokenized examples (input_ids, labels...), packed rows (data.pack), raw records of a common
    shape (messages, ShareGPT, Alpaca, prompt/response; tokenized here, responses-only when responses_only=True),
    or for SFT any dataset TRL accepts. args: None for fastload's defaults (training_arguments). If args.optim is
    TrainingArguments' default or "adamw_8bit", the optimizer is fastload's AdamW8bit (bitsandbytes', with lean
    steps: fastload.train.adamw8bit; no decay on biases and norms, 32-bit state for trained embeddings, as transformers'
    adamw_8bit), unless optim_args are set (then transformers' adamw_8bit); any other optim the user set is kept.
    """
    fields = {k: trainer_kwargs.pop(k) for k in list(trainer_kwargs) if k in argument_fields(sft)}
    if args is None:
        args = training_arguments(fields.pop("output_dir", DEFAULT_OUTPUT_DIR), sft=sft, model=model, **fields)
    elif fields:  # get_trainer(..., args=args, max_steps=10): the keywords win over args' values
        args = dataclasses.replace(args, **fields)
    args = _normalize_args(args, model, sft)
    for_training(model)  # a model left in generation mode gets train mode and its checkpointing back
    if not args.gradient_checkpointing and is_checkpointing(model):
        logger.info("the trainer's args have gradient_checkpointing=False; the model keeps the non-reentrant "
                    "checkpointing it was loaded with (load with gradient_checkpointing=False to train without)")
    max_length = args.max_length if sft else getattr(model, "max_seq_length", None)
    train_dataset = _prepare_dataset(train_dataset, tokenizer, max_length, sft, responses_only)
    eval_dataset = _prepare_dataset(eval_dataset, tokenizer, max_length, sft, responses_only)
    packed = "position_ids" in _columns(train_dataset)
    if data_collator is None and (not sft or packed):
        from fastload.data import Collator

        data_collator = Collator(tokenizer)
    if sft and packed:
        # TRL's own collator would add an all-ones attention_mask and let packed sequences see each other
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        args.remove_unused_columns = False  # TRL keeps only input_ids/labels/seq_lengths: position_ids would go
    trainer_kwargs = add_fastload_parts(model, args, trainer_kwargs)
    _refuse_unknown_keywords(trainer_kwargs, sft)
    align_pad_token(model, tokenizer)
    kw = dict(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
              processing_class=tokenizer, data_collator=data_collator, **trainer_kwargs)
    if not sft:
        from transformers import Trainer

        return saving_locally(Trainer)(**kw)
    dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    trainer = saving_locally(import_trl().SFTTrainer)(**kw)
    restore_adapter_dtypes(model, dtypes)
    return trainer


def align_pad_token(model, tokenizer) -> None:
    """The pad token fastload gave the tokenizer at load, told to the model's configs before the Trainer does it
    with a warning about a change the user did not make."""
    pad = getattr(tokenizer, "pad_token_id", None)
    config = getattr(model, "config", None)
    if pad is None or config is None:
        return
    text_config = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    generation = getattr(model, "generation_config", None)
    if text_config.pad_token_id != pad or (generation is not None and generation.pad_token_id != pad):
        text_config.pad_token_id = pad
        if generation is not None:
            generation.pad_token_id = pad
        logger.info("pad token: the model's config now names the tokenizer's %r (id %s)", tokenizer.pad_token, pad)


def sft_args_for(model, args):
    """An SFTConfig for this model: max_length at its max_seq_length where left at TRL's default, non-reentrant
    checkpointing (what get_trainer does to the args it is given)."""
    return _normalize_args(args, model, sft=True)


def argument_fields(sft: bool) -> set[str]:
    """The field names of TrainingArguments (SFTConfig with sft=True): what get_trainer routes into its args."""
    return {f.name for f in dataclasses.fields(arguments_class(sft)) if f.init}


def add_fastload_parts(model, args, trainer_kwargs: dict) -> dict:
    """A trainer's keyword arguments plus fastload's AdamW8bit (where args leave the optimizer to the defaults and
    none is given) and the checkpointing guard (once)."""
    trainer_kwargs = dict(trainer_kwargs)
    if "optimizers" not in trainer_kwargs and "optimizer_cls_and_kwargs" not in trainer_kwargs \
            and _fastload_optimizer_serves(args):
        from fastload.train.optim import get_optimizer

        trainer_kwargs["optimizers"] = (get_optimizer(model, lr=args.learning_rate, weight_decay=args.weight_decay,
                                                      betas=(args.adam_beta1, args.adam_beta2),
                                                      eps=args.adam_epsilon), None)
        logger.info("optimizer: fastload's bitsandbytes AdamW8bit (args.optim: %s)", _name(args.optim))
    callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
    if not any(isinstance(c, CheckpointingGuard) for c in callbacks):
        callbacks.append(checkpointing_guard(model))
    trainer_kwargs["callbacks"] = callbacks
    return trainer_kwargs


def steady_switches(trainer_cls):
    """The TRL preference or GRPO trainer class whose train(), evaluate() and predict() turn TRL's checkpointing
    switches (around every reference or scoring pass) into flag flips that keep the model's checkpoint functions
    (steady_checkpointing), and keep their use of transformers' deprecated names from warning the user. (An
    evaluation inside train() is already covered; one called on its own would otherwise leave torch's plain function
    on every layer for the training after it.)"""
    from fastload._log import quiet_trl_checkpointing_toggles
    from fastload.train.checkpointing import steady_checkpointing

    def steady(method):
        @functools.wraps(method)
        def wrapped(self, *args, **kwargs):
            with quiet_trl_checkpointing_toggles(), steady_checkpointing(self.model):
                return method(self, *args, **kwargs)
        return wrapped

    steadied = {name: steady(getattr(trainer_cls, name)) for name in ("train", "evaluate", "predict")}
    return type(trainer_cls.__name__, (trainer_cls,), steadied)


def saving_locally(trainer_cls):
    """The trainer class whose checkpoints never reach the hub: each one runs peft's save, which otherwise looks up
    the base repo's config.json online (the repo id and token leave the machine; a slow hub stalls every save).
    A checkpoint that fails on a full disk says so (torch reports it as "unexpected pos", safetensors in Rust)."""
    from fastload.atomic import disk_full_error
    from fastload.errors import SaveError
    from fastload.sources.hub import hub_calls_off

    class SavingLocally(trainer_cls):
        def _save(self, *args, **kwargs):
            with hub_calls_off():
                return super()._save(*args, **kwargs)

        def _save_checkpoint(self, *args, **kwargs):
            try:
                return super()._save_checkpoint(*args, **kwargs)
            except Exception as e:
                full = None if isinstance(e, SaveError) else disk_full_error(e, self.args.output_dir)
                if full is None:
                    raise
                raise SaveError(f"Saving a training checkpoint in {self.args.output_dir}", found="the disk is full",
                                fix="free space or pass another output folder; the checkpoints saved before are "
                                    "kept, --resume continues from the last one") from e

    SavingLocally.__name__ = SavingLocally.__qualname__ = f"Fastload{trainer_cls.__name__}"
    return SavingLocally


def restore_adapter_dtypes(model, dtypes: dict) -> None:
    """TRL casts the adapters of a quantized model to bf16; fastload keeps them as loaded (fp32 on purpose)."""
    changed = 0
    for name, p in model.named_parameters():
        if name in dtypes and p.dtype != dtypes[name]:
            p.data = p.data.to(dtypes[name])
            changed += 1
    if changed:
        logger.info("kept %d adapter tensors in %s (TRL had cast them to bf16)", changed,
                    str(next(iter(dtypes.values()))).replace("torch.", ""))
