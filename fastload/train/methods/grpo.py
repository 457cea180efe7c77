"""GRPO (group relative policy optimization) on the loaded model: TRL's GRPOTrainer with fastload's defaults.

The policy samples `num_generations` completions per prompt, plain Python reward functions score them, and the
update pushes up the completions that scored above their group's mean. What fastload adds: its 8-bit AdamW, the
device's precision, gradient checkpointing kept on for the update and switched off (with the KV cache on) for the
generation of every step by flipping flags (checkpointing.generation_step), the adapters kept in the dtype they
were loaded in, and reward functions checked so a bad one fails with its own name.

Generation runs through the model's own `generate` (batched, left-padded by TRL). vLLM is an optional backend
(`backend="vllm"`): TRL imports it, only when it is asked for and installed.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
from typing import Any, Callable, Iterable, Sequence

from fastload._log import logger
from fastload.errors import BackendUnavailable, InvalidOption
from fastload.train.trainer import (
    TRAINING_DEFAULTS,
    add_fastload_parts,
    current_checkpointing_names,
    import_trl,
    loader_flags,
    precision_flags,
    restore_adapter_dtypes,
    saving_locally,
    steady_switches,
)

# fastload's GRPO defaults, on top of TRAINING_DEFAULTS; anything given to build(...) wins.
GRPO_DEFAULTS: dict[str, Any] = {
    "learning_rate": 5e-6,           # LoRA under RL: steps of an SFT rate (2e-4) collapse the policy
    "num_generations": 4,            # the group whose mean reward is each completion's baseline
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "max_completion_length": 128,
    "logging_steps": 1,
}
BACKENDS = ("generate", "vllm")


# -- reward functions ---------------------------------------------------------------------------------------------

def load_reward(spec: str) -> Callable:
    """`"package.module:function"` -> the function (what `fastload train --reward` takes).

    Raises:
        InvalidOption: not of the form module:function, the module does not import, or no such callable.
    """
    asked = f"Loading the reward function {spec!r}"
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InvalidOption(asked, found="no ':' between module and function", fix="write it as module:function, "
                            "e.g. my_rewards:short_answers (the module on PYTHONPATH)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InvalidOption(asked, found=f"module {module_name!r} does not import ({e})",
                            fix="put the module's folder on PYTHONPATH or install it") from e
    func = getattr(module, attr, None)
    if not callable(func):
        raise InvalidOption(asked, found=f"{module_name} has no callable {attr!r}",
                            fix=f"define def {attr}(prompts, completions, **kwargs) -> list[float] in it")
    return func


def checked_reward(func: Callable | str) -> Callable:
    """The reward function wrapped so that a wrong return fails with its name, and named (TRL logs each reward
    under the function's __name__, which partials and callable objects lack).

    A reward function is TRL's: `func(prompts, completions, **columns) -> list[float | None]`, one score per
    completion; completions are strings for text prompts, `[{"role": "assistant", "content": ...}]` for chat ones.
    """
    if isinstance(func, str):
        func = load_reward(func)
    if not callable(func):
        raise InvalidOption("Using a reward function", found=f"a {type(func).__name__}, not a callable",
                            fix="pass functions (prompts, completions, **kwargs) -> list of floats")
    name = getattr(func, "__name__", None) or type(func).__name__

    @functools.wraps(func, assigned=("__module__", "__doc__"))
    def reward(prompts, completions, **kwargs):
        scores = func(prompts=prompts, completions=completions, **kwargs)
        if not isinstance(scores, (list, tuple)) or len(scores) != len(completions) or \
                not all(s is None or isinstance(s, (int, float)) for s in scores):
            shown = f"{type(scores).__name__} of length {len(scores)}" if isinstance(scores, (list, tuple)) \
                else type(scores).__name__
            raise InvalidOption(f"Scoring {len(completions)} completions with the reward function {name}",
                                found=f"it returned a {shown}",
                                fix="return a list with one float (or None to skip) per completion")
        return [None if s is None else float(s) for s in scores]

    reward.__name__ = reward.__qualname__ = name
    return reward


# -- data ---------------------------------------------------------------------------------------------------------

def prompt_records(data: Iterable) -> list[dict]:
    """Records with a `prompt` (a string, or a list of chat messages): what GRPO samples from. Strings become
    `{"prompt": s}`; other fields stay and reach the reward functions as keyword arguments (an answer key...)."""
    records = []
    for i, item in enumerate(data):
        record = {"prompt": item} if isinstance(item, str) else item
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), (str, list)):
            found = f"keys {sorted(record)}" if isinstance(record, dict) else f"a {type(item).__name__}"
            raise InvalidOption(f"Reading GRPO prompt {i}", found=found,
                                fix="give strings or records with a 'prompt' (a string or a list of messages)")
        records.append(dict(record))
    if not records:
        raise InvalidOption("Reading GRPO prompts", found="no prompt", fix="give at least one prompt")
    return records


def as_dataset(data):
    """A datasets.Dataset (what TRL samples from); one given passes unchanged."""
    from datasets import Dataset

    if isinstance(data, Dataset) or hasattr(data, "column_names"):
        return data
    return Dataset.from_list(prompt_records(data))


# -- arguments ----------------------------------------------------------------------------------------------------

def grpo_config(model, output_dir: str = "outputs", backend: str = "generate", **kwargs: Any):
    """A GRPOConfig with fastload's defaults (TRAINING_DEFAULTS, then GRPO_DEFAULTS, the model's precision, the
    completion length within max_seq_length); kwargs win.

    Raises:
        InvalidOption: an unknown field or backend.
        BackendUnavailable: backend="vllm" where vLLM is not installed.
    """
    cls = import_trl().GRPOConfig
    options = {**TRAINING_DEFAULTS, **GRPO_DEFAULTS, **precision_flags(model), **loader_flags()}
    limit = getattr(model, "max_seq_length", None)
    if limit:
        options["max_completion_length"] = min(options["max_completion_length"], limit // 2)
    options.update(vllm_options(backend))
    options.update(kwargs)
    options = current_checkpointing_names(cls, options)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InvalidOption(f"GRPO options {', '.join(unknown)}", found="not fields of TRL's GRPOConfig",
                            fix="use GRPOConfig field names (num_generations, max_completion_length, beta, ...)")
    return cls(output_dir=str(output_dir), **options)


def vllm_options(backend: str) -> dict[str, Any]:
    """GRPOConfig fields for the generation backend: the model's own generate, or vLLM colocated where installed
    (looked up, never imported here: TRL imports it when it builds the trainer)."""
    if backend not in BACKENDS:
        raise InvalidOption(f"GRPO backend={backend!r}", found="not a generation backend",
                            fix=f"use one of {', '.join(BACKENDS)}")
    if backend == "generate":
        return {}
    if importlib.util.find_spec("vllm") is None:
        raise BackendUnavailable("GRPO generation with vLLM (backend='vllm')", found="vllm is not installed",
                                 fix="pip install vllm (CUDA), or use backend='generate' (the model's own generate)")
    return {"use_vllm": True, "vllm_mode": "colocate"}


# -- the trainer --------------------------------------------------------------------------------------------------

def fastload_grpo_trainer():
    """TRL's GRPOTrainer whose checkpoints stay local, generating with checkpointing off and the KV cache on."""
    from fastload.train.checkpointing import generation_step

    class GRPOTrainer(steady_switches(saving_locally(import_trl().GRPOTrainer))):
        def _generate_and_score_completions(self, inputs):
            # TRL would disable and re-enable checkpointing itself (twice a step, re-installing torch's function
            # over the engine's); with the flags already off it leaves them alone
            with generation_step(self.model):
                return super()._generate_and_score_completions(inputs)

    GRPOTrainer.__name__ = GRPOTrainer.__qualname__ = "FastloadGRPOTrainer"
    return GRPOTrainer


def build(model, tokenizer, data, args=None, reward_funcs: Callable | str | Sequence = (),
          backend: str = "generate", **kwargs: Any):
    """TRL's GRPOTrainer for the loaded model with fastload's defaults.

    Args:
        model: the model from FastModel.from_pretrained (LoRA on, checkpointing on).
        tokenizer: its tokenizer.
        data: prompts: strings, records with a `prompt` (string or chat messages) and any other fields (passed to
            the reward functions), or a datasets.Dataset with a `prompt` column.
        args: a GRPOConfig (None: grpo_config's defaults with the GRPOConfig fields among kwargs).
        reward_funcs: one or more callables `(prompts, completions, **columns) -> list[float]`, or
            "module:function" strings.
        backend: "generate" (the model's own generate) or "vllm" (where installed).
        **kwargs: GRPOConfig fields, and GRPOTrainer arguments (callbacks, optimizers ...).

    Returns:
        The trainer; `.train()` runs it.

    Raises:
        InvalidOption: no reward function, one that is not callable, bad prompts or options.
        BackendUnavailable: TRL missing, or backend="vllm" without vLLM.

    Example:
        >>> def short(prompts, completions, **kw): return [-len(c) / 100 for c in completions]
        >>> trainer = build(model, tokenizer, ["Say hi"] * 16, reward_funcs=short, max_steps=20)
    """
    funcs = [reward_funcs] if callable(reward_funcs) or isinstance(reward_funcs, str) else list(reward_funcs)
    if not funcs:
        raise InvalidOption("Building a GRPO trainer", found="no reward function",
                            fix="pass reward_funcs=[f, ...] with f(prompts, completions, **kwargs) -> list[float]")
    fields = {f.name for f in dataclasses.fields(import_trl().GRPOConfig) if f.init}
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
    if args is None:
        args = grpo_config(model, backend=backend, **options)
    elif options:
        args = dataclasses.replace(args, **options)
    if args.gradient_checkpointing:
        args.gradient_checkpointing_kwargs = {"use_reentrant": False, **(args.gradient_checkpointing_kwargs or {})}
    trainer_kwargs = add_fastload_parts(model, args, kwargs)
    dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    trainer = fastload_grpo_trainer()(model=model, reward_funcs=[checked_reward(f) for f in funcs], args=args,
                                      train_dataset=as_dataset(data), processing_class=tokenizer, **trainer_kwargs)
    restore_adapter_dtypes(model, dtypes)
    logger.info("GRPO: %d generations per prompt, completions up to %d tokens, generation by %s",
                args.num_generations, args.max_completion_length, "vLLM" if args.use_vllm else "model.generate")
    return trainer
