"""FastModel: one call from a model name to a model ready for QLoRA training."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from fastload._log import logger
from fastload.compat.options import UNSLOTH_LOAD_NAMES, split_load_options, split_peft_options
from fastload.compat.peft_extras import apply_peft_extras, target_groups_settings, unload_adapter
from fastload.compat.save_methods import attach_save_methods
from fastload.compat.trl_install import install_trl_compat
from fastload.errors import AdapterError, FastloadError, InvalidOption
from fastload.load.collection import collector_paused
from fastload.load.devices import release_load_leftovers
from fastload.load.loader import LoadOptions
from fastload.load.phases import phase, recording
from fastload.model_state import state_of
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
                        fsdp: bool | None = None, task: str | None = None, num_labels: int | None = None,
                        **quant_options: Any):
        """Load `model_name` (hub id, registry alias, local directory, adapter directory or .gguf file) for QLoRA.

        `fastload.resolve(...)` shows the plan first; docs/loading.md's options table says the same with the defaults.
        Under torchrun / accelerate launch each rank loads onto its own GPU, rank 0 first (it alone writes the
        store); fsdp=True (or the launcher's FSDP config) prepares the model for FSDP2-QLoRA (docs/multi-gpu.md).
        task="sequence-classification" with num_labels=N loads a classifier (or, with 1 label, a reward head): the
        4-bit body with LoRA and a new `score` head trained in full in fp32 (see fastload.load.task). A classifier's
        saved adapter folder loads as a classifier again without them.

        Args:
            model_name: hub id, registry alias, local folder (16-bit or pre-quantized), adapter folder or .gguf file.
            max_seq_length: longest training sequence, also the tokenizer's model_max_length (default 2048, capped
                at the model's positions).
            dtype: compute dtype (default: bf16 where the device computes it natively, else fp16 on GPUs, fp32 on
                the CPU).
            load_in_4bit: NF4/FP4 via bitsandbytes (default True).
            load_in_8bit: LLM.int8 instead of 4-bit.
            quantization_config: a transformers BitsAndBytesConfig (or dict); wins over the flags.
            lora: a dict of peft.LoraConfig fields, a LoraSettings, or None for no adapters (default r=16,
                alpha=16, every linear projection).
            gradient_checkpointing: non-reentrant checkpointing (default True); False turns it off.
            device_map: transformers' device map (default: the first GPU, else the CPU).
            revision: the hub revision (branch, tag or commit).
            token: the hub token (never logged).
            cache_dir: the Hugging Face cache folder.
            local_files_only: never reach the hub (HF_HUB_OFFLINE=1 does the same).
            trust_remote_code: run the checkpoint's own Python code; never turned on implicitly.
            attn_implementation: any transformers value or "xformers" (default: the best the device runs).
            random_state: seed for the LoRA initialisation.
            prefer_prequantized: use a registry -bnb-4bit checkpoint when the quantization settings match.
            store: read and write fastload's local store of 4-bit copies; False bypasses it, or pass a Store.
            allow_pickle: accept .bin/.pt checkpoints (unpickling can run code).
            backend: "native", "unsloth" (Unsloth's loader and kernels) or "auto" (Unsloth only where it can run).
            rope_scaling: passed to the config, for longer contexts.
            engine: the performance engine: True, False, or a dict of levers (fused_lora, fused_loss,
                offload_checkpointing, kernels, cuda_graphs).
            fsdp: prepare for FSDP2-QLoRA (quant storage = compute dtype, FSDP's own checkpointing); default:
                what the launcher's config says.
            task: "causal-lm" (default) or "sequence-classification" (a classifier or reward head).
            num_labels: the classifier's number of labels (1: a reward model's score).
            **quant_options: bitsandbytes options (bnb_4bit_quant_type, bnb_4bit_use_double_quant,
                bnb_4bit_compute_dtype, bnb_4bit_quant_storage, llm_int8_*) and Unsloth's keyword names.

        Returns:
            (model, tokenizer): a transformers model (a peft model when lora is set) and its tokenizer.

        Raises:
            InvalidOption: an option out of range or unknown (the error suggests the close match).
            ModelNotFound, GatedModel: the name resolves to nothing reachable, or to a repo the token cannot read.
            CheckpointCorrupt, CheckpointIncomplete, UnsafeCheckpoint: the files are damaged, partial or pickled.
            UnsupportedArchitecture, NotEnoughMemory, DeviceUnavailable: the model cannot run here.
        """
        from fastload import distributed
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
        from fastload.load.task import CAUSAL_LM, check_task

        task, num_labels = _saved_task(model_name, task, num_labels)
        task = check_task(task, num_labels)
        if task != CAUSAL_LM:
            store, engine = _classifier_options(task, store, engine, backend)
        lora_settings = LoraSettings() if lora is _DEFAULT else None if lora is None else LoraSettings.from_user(lora)
        store_obj = make_store(store)
        started = time.perf_counter()
        device_map = distributed.join_launch(device_map)
        fsdp = distributed.fsdp_from_launcher() if fsdp is None else fsdp
        if fsdp:
            from fastload.train.fsdp import fsdp_load_options

            quant_options, engine = fsdp_load_options(quant_options, quantization_config, dtype, device_map, engine)

        from fastload.engine import EngineSettings

        engine_settings = EngineSettings.from_user(engine)  # a bad engine= is refused before any thread starts
        warm_up = _start_triton_warm_up(device_map, engine, backend)

        def load():
            with phase("resolve"):
                plan = resolve(model_name, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                               prefer_prequantized=prefer_prequantized, store=store_obj if store_obj else False,
                               allow_pickle=allow_pickle, quantization_config=quantization_config,
                               **quant_flags(load_in_4bit, load_in_8bit), **quant_options)
            plan = distributed.store_writes_on_rank_zero(plan)
            logger.info("source: %s (%s)", plan.location, plan.reason)
            opts = LoadOptions(task=task, num_labels=num_labels, max_seq_length=max_seq_length, dtype=dtype,
                               device_map=device_map, token=token, cache_dir=cache_dir,
                               local_files_only=local_files_only, trust_remote_code=trust_remote_code,
                               attn_implementation=attn_implementation, allow_pickle=allow_pickle,
                               rope_scaling=rope_scaling)
            impl = choose_backend(backend, plan, opts)
            checkpointing = gradient_checkpointing and not fsdp  # under FSDP: its own wrapper, set by the trainer
            loaded = impl.load(plan, opts, store_obj, lora_settings, checkpointing, random_state)
            distributed.finish_store_writes()
            return plan, impl, *loaded

        try:
            with recording() as phases, collector_paused():  # phases: model.fastload.load_phases
                plan, impl, model, tokenizer = distributed.rank_zero_first(f"Loading {str(model_name)!r}", load)
                if fsdp:
                    from fastload.train.fsdp import prepare_for_fsdp

                    prepare_for_fsdp(model, bool(gradient_checkpointing))
                warm_up.join()  # before any kernel can launch
                if impl.name == "native":
                    from fastload.engine import apply_engine

                    with phase("engine"):
                        apply_engine(model, engine_settings, bool(gradient_checkpointing) and not fsdp)
        finally:
            _release_store_writes()
            warm_up.join()
        release_load_leftovers(model)
        state_of(model).load_phases = phases
        model.max_seq_length = getattr(model, "max_seq_length", None) or max_seq_length
        state = state_of(model)
        state.plan, state.backend = plan, impl.name
        tokenizer.model_max_length = model.max_seq_length or tokenizer.model_max_length
        if task != CAUSAL_LM and model.config.pad_token_id is None:  # the classifier reads the last non-pad token
            model.config.pad_token_id = tokenizer.pad_token_id
        attach_save_methods(model)
        logger.info("ready in %.1f s on %s%s", time.perf_counter() - started, _device_of(model), _memory_note(model))
        return model, tokenizer

    @classmethod
    def get_peft_model(cls, model, random_state: int | None = DEFAULT_SEED, **lora_options: Any):
        """Add LoRA adapters to a model loaded with lora=None (defaults: r=16, alpha=16, every projection).

        Unsloth's keywords (use_gradient_checkpointing, loftq_config, max_seq_length...) are understood. On a model
        that still has the untrained default adapter from_pretrained added, the asked adapter replaces it (logged).

        Args:
            model: a model from from_pretrained.
            random_state: seed for the LoRA initialisation.
            **lora_options: peft.LoraConfig fields (r, lora_alpha, target_modules, lora_dropout, ...) or Unsloth's.

        Returns:
            The peft model, with gradient checkpointing as the model had it (or as asked).

        Raises:
            AdapterError: the model already has trained adapters that differ from those asked.
            InvalidOption: a LoRA option out of range or unknown.
        """
        from fastload.train.checkpointing import enable_checkpointing, is_checkpointing
        from fastload.train.lora import apply_lora, has_adapters, lora_settings_of, untrained_adapter

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
        fsdp = state_of(model, create=False).fsdp  # loaded with fsdp=True: FSDP's checkpointing, not this
        checkpointing = asked.get("gradient_checkpointing", is_checkpointing(model))
        peft_model = apply_lora(model, settings, random_state)
        if checkpointing and not fsdp:
            enable_checkpointing(peft_model)
        if fsdp:
            from fastload.train.fsdp import prepare_for_fsdp

            prepare_for_fsdp(peft_model, fsdp["activation_checkpointing"])
        engine = state_of(peft_model).engine_settings
        if engine is not None:  # the levers that apply to the new adapters (apply_engine keeps what it installed)
            from fastload.engine import apply_engine

            apply_engine(peft_model, engine, bool(checkpointing) and not fsdp)
        return apply_peft_extras(attach_save_methods(peft_model), asked)

    @staticmethod
    def get_optimizer(model, lr: float = 2e-4, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                      **kwargs: Any):
        """bitsandbytes AdamW8bit over exactly the trainable parameters, with fastload's lean step (one update
        launch per pack of LoRA matrices, no device synchronization per parameter: fastload.train.adamw8bit), grouped
        like transformers' adamw_8bit (no weight decay on biases and norms; 32-bit state for a trained embedding).

        Args:
            model: the model to train; only parameters with requires_grad are optimized.
            lr: the learning rate.
            weight_decay: applied to weights, never to biases and norms.
            betas: Adam's moment coefficients.
            **kwargs: further bitsandbytes AdamW8bit options (eps, ...).

        Returns:
            A bitsandbytes AdamW8bit (subclass) instance.
        """
        from fastload.train.optim import get_optimizer

        return get_optimizer(model, lr=lr, weight_decay=weight_decay, betas=betas, **kwargs)

    @staticmethod
    def for_inference(model):
        """Generation mode: checkpointing off, KV cache on, eval.

        Args:
            model: the loaded or trained model.

        Returns:
            The same model, switched.
        """
        if state_of(model, create=False).backend == "unsloth":
            from unsloth import FastLanguageModel  # already imported by the load that chose it

            FastLanguageModel.for_inference(model)
            return model
        from fastload.train.checkpointing import for_inference

        return for_inference(model)

    @staticmethod
    def for_training(model):
        """Training mode again, with checkpointing as it was.

        Args:
            model: a model switched by for_inference (or loaded).

        Returns:
            The same model, switched.
        """
        if state_of(model, create=False).backend == "unsloth":
            from unsloth import FastLanguageModel

            FastLanguageModel.for_training(model)
            return model
        from fastload.train.checkpointing import for_training

        return for_training(model)

    @staticmethod
    def resolve(model_name, **options: Any):
        """The LoadPlan for `model_name` without loading anything: `fastload.resolve` (its docstring has the Args)."""
        from fastload.sources.resolve import resolve

        return resolve(model_name, **options)

    # -- the rest of the notebook: train, save, merge, generate (fastload.train.trainer / saving / generation) ---

    @staticmethod
    def training_arguments(output_dir: str | os.PathLike = "outputs", sft: bool = False, model=None, **kwargs: Any):
        """TrainingArguments (SFTConfig when sft=True) with fastload's defaults: optim="adamw_8bit", lr 2e-4,
        non-reentrant gradient checkpointing, bf16/fp16 as the device computes, report_to="none"; with `model`,
        SFT's max_length is model.max_seq_length. Any field given here wins.

        Args:
            output_dir: where the trainer writes checkpoints and logs.
            sft: build TRL's SFTConfig instead of TrainingArguments.
            model: the loaded model, whose max_seq_length becomes SFT's max_length.
            **kwargs: any TrainingArguments / SFTConfig field.

        Returns:
            A transformers TrainingArguments or a trl SFTConfig.
        """
        from fastload.train.trainer import training_arguments

        return training_arguments(output_dir, sft=sft, model=model, **kwargs)

    @staticmethod
    def get_trainer(model, tokenizer, train_dataset, args=None, sft: bool = False, method: str = "sft",
                    **kwargs: Any):
        """The trainer of a training method for the loaded model, with fastload's defaults (8-bit AdamW,
        checkpointing kept on, the model's precision and max_seq_length).

        method: "sft" (default: transformers' Trainer over responses-only tokenized records, or TRL's SFTTrainer with
        sft=True; see fastload.train.trainer.get_trainer), "dpo", "orpo", "kto", "simpo" (TRL, records of
        prompt/chosen/rejected or prompt/completion/label), "grpo", "pretrain", "classify" (a model loaded with
        task="sequence-classification", records of text/label). fastload.train.methods lists them.
        """
        from fastload.train.methods import build_trainer

        if sft and method != "sft":
            raise InvalidOption(f"get_trainer(sft=True, method={method!r})", found="sft=True asks for SFT",
                                fix="pass method only, or sft=True alone")
        if method == "sft":
            kwargs["sft"] = sft
        return build_trainer(method, model, tokenizer, train_dataset, args=args, **kwargs)

    @staticmethod
    def save_adapter(model, directory: str | os.PathLike, tokenizer=None):
        """The LoRA adapter alone; FastModel.from_pretrained(directory) loads base + adapter to train on.

        Args:
            model: the trained peft model.
            directory: the folder to write, whole or not at all.
            tokenizer: saved beside the adapter when given.

        Returns:
            The folder's Path.

        Raises:
            AdapterError: the model has no LoRA adapters.
            InvalidOption: the folder holds files fastload did not write.
            SaveError: the disk is full or the folder cannot be written.
        """
        from fastload.save.adapters import save_adapter

        return save_adapter(model, directory, tokenizer=tokenizer)

    @staticmethod
    def save_merged(model, directory: str | os.PathLike, tokenizer=None, source: str = "auto",
                    quantize: bool = False, **kwargs: Any):
        """LoRA merged into 16-bit weights (the 16-bit source if on this machine, else the dequantized 4-bit ones),
        saved for plain transformers; quantize=True writes a bitsandbytes 4-bit checkpoint instead.

        Args:
            model: the trained peft model.
            directory: the folder to write, whole or not at all.
            tokenizer: saved beside the weights (default: the source's tokenizer files, copied).
            source: "auto", "16bit" (the original must be on this machine) or "dequantized".
            quantize: write a bitsandbytes 4-bit checkpoint of the merged model.
            **kwargs: dtype, max_shard_size, verify, probe_texts (fastload.save.merged.save_merged).

        Returns:
            The folder's Path.

        Raises:
            AdapterError: no adapters, an adapter merging cannot handle (DoRA, LoRA biases), or source="16bit"
                with no 16-bit original here.
            InvalidOption: an unknown source, a bad max_shard_size, or a folder holding files fastload did not write.
            SaveError: the disk is full or the folder cannot be written.
        """
        from fastload.save.merged import save_merged

        return save_merged(model, directory, tokenizer=tokenizer, source=source, quantize=quantize, **kwargs)

    @staticmethod
    def save_gguf(model, path: str | os.PathLike, tokenizer=None, quantization: str = "q8_0", **kwargs: Any):
        """One .gguf file for llama.cpp / Ollama (LoRA merged first) and an Ollama Modelfile beside it.

        Args:
            model: the trained model.
            path: the .gguf file to write; an existing file is replaced only once the new one is complete.
            tokenizer: the tokenizer trained with (the GGUF file carries the vocabulary and chat template).
            quantization: "q8_0", "f16", "bf16", or a llama.cpp k-quant such as "q4_k_m" (needs llama-cpp-python).
            **kwargs: source, modelfile, verify, probe_texts (fastload.export.gguf.save_gguf).

        Returns:
            The written file's Path.

        Raises:
            UnsupportedArchitecture: the family, its rope scaling or its tokenizer cannot be written.
            InvalidOption: an unknown quantization, or a folder at `path`.
            BackendUnavailable: a k-quant without llama-cpp-python installed.
            AdapterError, SaveError: the merge or the write failed; no partial file is left.
        """
        from fastload.export.gguf import save_gguf

        return save_gguf(model, path, tokenizer=tokenizer, quantization=quantization, **kwargs)

    @staticmethod
    def push_to_hub(model, repo_id: str, tokenizer=None, what: str = "adapter", private: bool = True,
                    token: str | None = None, **kwargs: Any):
        """Build the adapter / merged / merged-4bit / gguf folder with a model card and upload it in one commit.

        Args:
            model: the trained model.
            repo_id: the hub repository ("user/name"), created when missing.
            tokenizer: uploaded beside the weights.
            what: "adapter", "merged", "merged-4bit" or "gguf".
            private: create the repository private.
            token: the hub token (default: the logged-in one; never logged).
            **kwargs: quantization (for "gguf"), training (facts for the model card), commit_message, endpoint.

        Returns:
            The URL of the commit.

        Raises:
            InvalidOption: an unknown `what` or a repo_id not of the form "user/name".
            SaveError: the hub refused the upload (the token is never in the message).
        """
        from fastload.export.hub import push_to_hub

        return push_to_hub(model, repo_id, tokenizer, what=what, private=private, token=token, **kwargs)

    @staticmethod
    def generate(model, tokenizer, prompts, max_new_tokens: int = 128, **kwargs: Any):
        """Chat-template the prompt(s), left-pad the batch, generate, and return only the new text.

        Args:
            model: the loaded or trained model.
            tokenizer: its tokenizer (its chat template is used when it has one).
            prompts: one prompt (str or list of messages) or a list of them.
            max_new_tokens: the most tokens generated per prompt.
            **kwargs: passed to model.generate (temperature, do_sample, ...).

        Returns:
            One string for one prompt, else a list of strings.
        """
        from fastload.train.generation import generate

        return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, **kwargs)


def _start_triton_warm_up(device_map, engine, backend: str):
    """Triton's once-per-process imports and cache key on a thread during the load, where the engine's kernels
    will run (fastload.engine.triton.warm_up); a no-op otherwise, and when device_map is bad (the load says so)."""
    from fastload.engine.triton.warm_up import TritonWarmUp
    from fastload.load.devices import main_device, resolve_device_map

    warm_up = TritonWarmUp()
    if engine and backend == "native":
        try:
            device = main_device(resolve_device_map(device_map))
        except FastloadError:
            return warm_up
        warm_up.start(device)
    return warm_up


def _classifier_options(task: str, store, engine, backend: str):
    """A classifier bypasses the store (its entries hold language models) and the engine (its levers patch the LM
    head and its loss); both are said in the log."""
    if backend != "native":
        raise InvalidOption(f"task={task!r}, backend={backend!r}", found="classifiers load with the native backend "
                            "only", fix="use backend='native' (the default)")
    if store:
        logger.info("task %s: the 4-bit store is not used (it keeps language models)", task)
    if engine:
        logger.info("task %s: fastload's engine levers are off (they patch the language-model head)", task)
    return False, False


def _saved_task(model_name, task: str | None, num_labels: int | None) -> tuple[str | None, int | None]:
    """A classifier's adapter folder loads as a classifier: its task and num_labels come from the folder."""
    from fastload.load.task import SEQUENCE_CLASSIFICATION, saved_classifier

    folder = os.path.expanduser(str(model_name))
    saved = saved_classifier(folder) if os.path.isdir(folder) else None
    if saved is None or (task is not None and num_labels == saved):
        return task, num_labels
    if task is not None or num_labels is not None:
        raise InvalidOption(f"task={task!r}, num_labels={num_labels!r}", found=f"the adapter in {folder} is a "
                            f"sequence classifier with {saved} labels", fix=f"pass num_labels={saved}, or leave "
                            "task and num_labels unset")
    logger.info("adapter %s is a sequence classifier (%d labels): loading it as one", folder, saved)
    return SEQUENCE_CLASSIFICATION, saved


def _release_store_writes() -> None:
    """Let a store write this load staged start after the first optimizer step (its copies would slow the step):
    the model is ready to train, or the load failed after staging it. The module is in sys.modules only if a write
    was staged; importing it (and torch) on an early error is not."""
    store_writes = sys.modules.get("fastload.load.background_store")
    if store_writes is not None:
        store_writes.release_store_writes_after_first_step()


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
