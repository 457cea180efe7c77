"""FastModel: one call from a model name to a model ready for QLoRA training."""

from __future__ import annotations

import os
import time
from typing import Any

from fastload.sources import plan as P
from fastload._log import logger
from fastload.compat.options import UNSLOTH_LOAD_NAMES, split_load_options, split_peft_options
from fastload.compat.peft_extras import apply_peft_extras, target_groups_settings, unload_adapter, untrained_adapter
from fastload.compat.save_methods import attach_save_methods
from fastload.compat.trl_install import install_trl_compat
from fastload.errors import AdapterError, InvalidOption
from fastload.load.loader import LoadOptions
from fastload.settings import DEFAULT_MAX_SEQ_LENGTH, DEFAULT_SEED, LoraSettings

_DEFAULT = object()  # lora left unset: fastload's default LoRA (settings.LoraSettings)
BACKENDS = ("native", "unsloth", "auto")


def lora_differences(current: dict, asked: LoraSettings) -> list[str]:
    """'name: has X, asked Y' for every setting the existing peft config does not match."""
    wanted = {"r": asked.r, "lora_alpha": asked.lora_alpha, "lora_dropout": asked.lora_dropout, "bias": asked.bias,
              **asked.extra}
    found = [f"{k}: has {current.get(k)!r}, asked {v!r}" for k, v in wanted.items() if current.get(k) != v]
    has, asked_targets = _targets(current.get("target_modules")), _targets(asked.target_modules)
    if asked.target_modules is not None and has != asked_targets:
        found.append(f"target_modules: has {has!r}, asked {asked_targets!r}")
    return found


def _targets(value):
    """peft's target_modules: a regex string, kept as is, or names in any order."""
    return value if isinstance(value, str) else sorted(set(value or []))


def quant_flags(load_in_4bit: bool | None, load_in_8bit: bool) -> dict:
    """load_in_4bit defaults to True, except that load_in_8bit=True alone means LLM.int8 (as in transformers)."""
    flags = {"load_in_8bit": load_in_8bit} if load_in_8bit else {}
    if load_in_4bit is not None:
        flags["load_in_4bit"] = load_in_4bit
    return flags


class FastModel:
    """The facade. Every method is a classmethod; models are plain transformers/peft models."""

    @classmethod
    def from_pretrained(cls, model_name: str | os.PathLike, max_seq_length: int | None = None, dtype: Any = None,
                        load_in_4bit: bool | None = None, load_in_8bit: bool = False, quantization_config: Any = None,
                        lora: Any = _DEFAULT, gradient_checkpointing: bool | str = True, device_map: Any = None,
                        revision: str | None = None, token: str | bool | None = None, cache_dir: str | None = None,
                        local_files_only: bool | None = None, trust_remote_code: bool = False,
                        attn_implementation: str | None = None, random_state: int | None = DEFAULT_SEED,
                        prefer_prequantized: bool = True, store: Any = True, allow_pickle: bool = False,
                        backend: str = "native", rope_scaling: dict | None = None, engine: Any = True,
                        **quant_options: Any):
        """Load `model_name` (hub id, registry alias, local directory, adapter directory or .gguf file) for QLoRA.

        Returns (model, tokenizer). See docs/loading.md for every option; `fastload.resolve(...)` shows the plan first.
        """
        from fastload._log import drop_bitsandbytes_kernels_hint
        from fastload.backends import choose_backend
        from fastload.sources.resolve import make_store, resolve

        drop_bitsandbytes_kernels_hint()

        if quant_options.keys() & UNSLOTH_LOAD_NAMES:  # Unsloth's keyword names: an Unsloth notebook, whose
            install_trl_compat()                        # SFTTrainer cell then needs TRL to take Unsloth's keywords
            translated, quant_options = split_load_options(quant_options)
            gradient_checkpointing = translated.get("gradient_checkpointing", gradient_checkpointing)
            load_in_4bit = translated.get("load_in_4bit", load_in_4bit)
        if backend not in BACKENDS:
            raise InvalidOption(f"backend={backend!r}", found=f"known backends: {', '.join(BACKENDS)}",
                                fix="use 'native' (default), 'unsloth' or 'auto'")
        if max_seq_length is not None and (not isinstance(max_seq_length, int) or max_seq_length <= 0):
            raise InvalidOption(f"max_seq_length={max_seq_length!r}", found="it must be a positive integer",
                                fix=f"use e.g. max_seq_length={DEFAULT_MAX_SEQ_LENGTH}")
        if attn_implementation == "xformers":
            from fastload.load.attention.xformers_attention import register_xformers_attention

            attn_implementation = register_xformers_attention()
        lora_settings = LoraSettings() if lora is _DEFAULT else None if lora is None else LoraSettings.from_user(lora)
        store_obj = make_store(store)
        started = time.perf_counter()
        plan = resolve(model_name, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                       prefer_prequantized=prefer_prequantized, store=store_obj if store_obj else False,
                       allow_pickle=allow_pickle, quantization_config=quantization_config,
                       **quant_flags(load_in_4bit, load_in_8bit), **quant_options)
        logger.info("source: %s (%s)", plan.location, plan.reason)
        opts = LoadOptions(max_seq_length=max_seq_length, dtype=dtype, device_map=device_map, token=token,
                           cache_dir=cache_dir, local_files_only=local_files_only, trust_remote_code=trust_remote_code,
                           attn_implementation=attn_implementation, allow_pickle=allow_pickle, rope_scaling=rope_scaling)
        impl = choose_backend(backend, plan, opts)
        model, tokenizer = impl.load(plan, opts, store_obj, lora_settings, gradient_checkpointing, random_state)
        if impl.name == "native":
            from fastload.engine import EngineSettings, apply_engine

            model.fastload_engine_settings = EngineSettings.from_user(engine)
            model.fastload_engine = apply_engine(model, model.fastload_engine_settings, bool(gradient_checkpointing))
        model.max_seq_length = getattr(model, "max_seq_length", None) or max_seq_length
        model.fastload_plan = plan
        model.fastload_backend = impl.name
        tokenizer.model_max_length = model.max_seq_length or tokenizer.model_max_length
        attach_save_methods(model)
        logger.info("ready in %.1f s on %s%s", time.perf_counter() - started, _device_of(model), _memory_note(model))
        return model, tokenizer

    @classmethod
    def get_peft_model(cls, model, random_state: int | None = DEFAULT_SEED, **lora_options: Any):
        """Add LoRA adapters to a model loaded with lora=None (defaults: r=16, alpha=16, every projection).

        Unsloth's keywords (use_gradient_checkpointing, loftq_config, max_seq_length...) are understood. On a model
        that still has the untrained default adapter from_pretrained added, the asked adapter replaces it (logged).
        """
        from fastload.train.checkpointing import enable_checkpointing, is_checkpointing
        from fastload.train.lora import apply_lora, has_adapters, lora_settings_of

        lora_options, asked = split_peft_options(lora_options)
        settings = LoraSettings.from_user(target_groups_settings(model, lora_options, asked))
        if has_adapters(model):
            differences = lora_differences(lora_settings_of(model), settings)
            if not differences:
                return apply_peft_extras(model, asked)  # the adapters it has (e.g. a notebook cell run twice)
            default = not lora_differences(lora_settings_of(model), LoraSettings())
            if not (default and untrained_adapter(model)):
                raise AdapterError("Adding LoRA adapters", found="the model already has adapters that differ from "
                                   "those asked: " + "; ".join(differences),
                                   fix="load the model again with lora=None, or keep the adapters it has")
            logger.info("replacing the untrained default LoRA adapter from_pretrained added with the one asked (%s)",
                        "; ".join(differences))
            model = unload_adapter(model)
        checkpointing = asked.get("gradient_checkpointing", is_checkpointing(model))
        peft_model = apply_lora(model, settings, random_state)
        if checkpointing:
            enable_checkpointing(peft_model)
        for attr in ("max_seq_length", "fastload_plan", "fastload_backend", "fastload_engine_settings", "fastload_engine"):
            if hasattr(model, attr):
                setattr(peft_model, attr, getattr(model, attr))
        if checkpointing and getattr(peft_model, "fastload_engine", None):
            from fastload.train.checkpointing import _base
            from fastload.engine.offloaded_checkpoint import uses_engine_checkpointing

            if not uses_engine_checkpointing(_base(peft_model)):  # e.g. LoRA dropout turned them off
                from fastload.engine.report import rebuilt

                kept = [lever for lever in peft_model.fastload_engine
                        if lever not in ("offload_checkpointing", "cuda_graphs")]
                peft_model.fastload_engine = rebuilt(peft_model.fastload_engine, kept)
        engine = getattr(model, "fastload_engine_settings", None)
        if engine is not None and engine.fused_lora:
            from fastload.engine import install_fused_lora_if_any
            from fastload.engine.report import note_fused_lora

            peft_model.fastload_engine = note_fused_lora(peft_model, install_fused_lora_if_any(peft_model))
        return apply_peft_extras(attach_save_methods(peft_model), asked)

    @staticmethod
    def get_optimizer(model, lr: float = 2e-4, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                      **kwargs: Any):
        """bitsandbytes AdamW8bit over exactly the trainable parameters, with fastload's lean step (one update
        launch per pack of LoRA matrices, no device synchronization per parameter: fastload.train.adamw8bit), grouped
        like transformers' adamw_8bit (no weight decay on biases and norms; 32-bit state for a trained embedding)."""
        from fastload.train.optim import get_optimizer

        return get_optimizer(model, lr=lr, weight_decay=weight_decay, betas=betas, **kwargs)

    @staticmethod
    def for_inference(model):
        """Generation mode: checkpointing off, KV cache on, eval."""
        if getattr(model, "fastload_backend", None) == "unsloth":
            from unsloth import FastLanguageModel  # already imported by the load that chose it

            FastLanguageModel.for_inference(model)
            return model
        from fastload.train.checkpointing import for_inference

        return for_inference(model)

    @staticmethod
    def for_training(model):
        """Training mode again, with checkpointing as it was."""
        if getattr(model, "fastload_backend", None) == "unsloth":
            from unsloth import FastLanguageModel

            FastLanguageModel.for_training(model)
            return model
        from fastload.train.checkpointing import for_training

        return for_training(model)

    @staticmethod
    def resolve(model_name, **options: Any):
        from fastload.sources.resolve import resolve

        return resolve(model_name, **options)

    # -- the rest of the notebook: train, save, merge, generate (fastload.train.trainer / saving / generation) ----------

    @staticmethod
    def training_arguments(output_dir: str | os.PathLike = "outputs", sft: bool = False, model=None, **kwargs: Any):
        """TrainingArguments (SFTConfig when sft=True) with fastload's defaults: optim="adamw_8bit", lr 2e-4,
        non-reentrant gradient checkpointing, bf16/fp16 as the device computes, report_to="none"; with `model`,
        SFT's max_length is model.max_seq_length. Any field given here wins."""
        from fastload.train.trainer import training_arguments

        return training_arguments(output_dir, sft=sft, model=model, **kwargs)

    @staticmethod
    def get_trainer(model, tokenizer, train_dataset, args=None, sft: bool = False, **kwargs: Any):
        """transformers' Trainer (TRL's SFTTrainer with sft=True) for the loaded model, with fastload's AdamW8bit
        where args.optim is left at transformers' default or "adamw_8bit" (see fastload.train.trainer.get_trainer). A
        Trainer built by hand should pass optimizers=(FastModel.get_optimizer(model), None) (or optim="adamw_8bit":
        transformers' bitsandbytes AdamW, slower steps). Raw records (messages, ShareGPT, Alpaca, prompt/response)
        are tokenized responses-only."""
        from fastload.train.trainer import get_trainer

        return get_trainer(model, tokenizer, train_dataset, args=args, sft=sft, **kwargs)

    @staticmethod
    def save_adapter(model, directory: str | os.PathLike, tokenizer=None):
        """The LoRA adapter alone; FastModel.from_pretrained(directory) loads base + adapter to train on."""
        from fastload.save.saving import save_adapter

        return save_adapter(model, directory, tokenizer=tokenizer)

    @staticmethod
    def save_merged(model, directory: str | os.PathLike, tokenizer=None, source: str = "auto",
                    quantize: bool = False, **kwargs: Any):
        """LoRA merged into 16-bit weights (the 16-bit source if on this machine, else the dequantized 4-bit ones),
        saved for plain transformers; quantize=True writes a bitsandbytes 4-bit checkpoint instead."""
        from fastload.save.saving import save_merged

        return save_merged(model, directory, tokenizer=tokenizer, source=source, quantize=quantize, **kwargs)

    @staticmethod
    def save_gguf(model, path: str | os.PathLike, tokenizer=None, quantization: str = "q8_0", **kwargs: Any):
        """One .gguf file for llama.cpp / Ollama (LoRA merged first) and an Ollama Modelfile beside it."""
        from fastload.export.gguf import save_gguf

        return save_gguf(model, path, tokenizer=tokenizer, quantization=quantization, **kwargs)

    @staticmethod
    def push_to_hub(model, repo_id: str, tokenizer=None, what: str = "adapter", private: bool = True,
                    token: str | None = None, **kwargs: Any):
        """Build the adapter / merged / merged-4bit / gguf folder with a model card and upload it in one commit."""
        from fastload.export.hub import push_to_hub

        return push_to_hub(model, repo_id, tokenizer, what=what, private=private, token=token, **kwargs)

    @staticmethod
    def generate(model, tokenizer, prompts, max_new_tokens: int = 128, **kwargs: Any):
        """Chat-template the prompt(s), left-pad the batch, generate, and return only the new text."""
        from fastload.train.generation import generate

        return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, **kwargs)


def _device_of(model) -> str:
    try:
        return str(next(model.parameters()).device)
    except StopIteration:
        return "?"


def _memory_note(model) -> str:
    import torch

    if torch.cuda.is_available() and _device_of(model).startswith("cuda"):
        return f", {torch.cuda.memory_allocated() / 1024 ** 3:.2f} GiB allocated"
    footprint = getattr(model, "get_memory_footprint", None)
    return f", weights {footprint() / 1024 ** 3:.2f} GiB" if callable(footprint) else ""
