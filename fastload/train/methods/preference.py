"""Preference tuning (DPO, ORPO, KTO, SimPO) through TRL, with fastload's defaults and records.

Records come in the common shapes: `prompt` / `chosen` / `rejected` as strings or conversations (or `chosen` /
`rejected` conversations that share their opening turns, the prompt), and for KTO `prompt` / `completion` / `label`
(preference pairs are split into one desirable and one undesirable record). fastload renders them with the
tokenizer's chat template itself, so the four trainers (TRL's experimental ORPO and CPO take strings only) see the
same text.

DPO and KTO need a reference model. fastload passes none, so TRL scores the reference with the same 4-bit base: for
a fresh adapter TRL's frozen "ref" copy of it is dropped (its zero lora_B makes it the base itself, and TRL then
disables the adapter), for a trained adapter the copy stays (the reference is where training started). No second
copy of the base model exists either way.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fastload._log import logger
from fastload.errors import AdapterError, InvalidOption

# LoRA preference tuning moves far less than SFT: a tenth of SFT's 2e-4 rate is what peers' DPO/ORPO recipes use.
PREFERENCE_LR = 2e-5
PAIR_SHAPES = ("prompt / chosen / rejected (strings or conversations)",
               "chosen / rejected conversations sharing their opening turns (the prompt)")
LABELLED_SHAPES = ("prompt / completion / label (true: desirable)",) + PAIR_SHAPES
REFERENCE_ADAPTER = "ref"  # the name TRL gives its frozen copy of the adapter


@dataclass(frozen=True)
class PreferenceMethod:
    """How fastload builds one preference method from TRL's classes."""

    name: str
    trainer: str  # "module:Class" inside trl
    config: str
    labelled: bool = False  # KTO: single completions with a desirable/undesirable label
    reference: bool = False  # scores against a reference model
    defaults: dict = field(default_factory=dict)  # the method's own config values fastload sets

    def classes(self):
        from fastload.train.trainer import import_trl

        import_trl()  # a missing TRL says how to install it
        return _import(self.trainer), _import(self.config)


def _import(path: str):
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


PREFERENCE_METHODS = {
    "dpo": PreferenceMethod("dpo", "trl:DPOTrainer", "trl:DPOConfig", reference=True),
    "orpo": PreferenceMethod("orpo", "trl.experimental.orpo:ORPOTrainer", "trl.experimental.orpo:ORPOConfig"),
    "kto": PreferenceMethod("kto", "trl:KTOTrainer", "trl:KTOConfig", labelled=True, reference=True),
    # SimPO is CPO's loss "simpo" without CPO's behaviour-cloning term (cpo_alpha=0), as in the SimPO paper
    "simpo": PreferenceMethod("simpo", "trl.experimental.cpo:CPOTrainer", "trl.experimental.cpo:CPOConfig",
                              defaults={"loss_type": "simpo", "cpo_alpha": 0.0}),
}


# -- records -> rendered text ---------------------------------------------------------------------------------

def _as_turns(value, field_name: str, role: str) -> list[dict[str, str]]:
    """A string is one turn of `role`; a list is a conversation in role/content or from/value form."""
    from fastload.data import _turns

    if isinstance(value, list):
        return _turns(value, field_name)
    return [{"role": role, "content": str(value)}]


def _shared_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen answer, rejected answer) of two conversations that share their opening turns."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1]["role"] == "assistant":  # the answers start at the assistant turns
        shared -= 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _missing(record, needed: tuple[str, ...], shapes: tuple[str, ...], index: int) -> None:
    from fastload.data import _is_missing

    if not isinstance(record, dict):
        raise InvalidOption(f"Reading preference record {index}", found=f"a {type(record).__name__}, not a dict",
                            fix=f"give dicts of one of these shapes: {'; '.join(shapes)}")
    absent = [k for k in needed if k not in record or _is_missing(record[k])]
    if absent:
        raise InvalidOption(f"Reading preference record {index}", found=f"no {', '.join(repr(k) for k in absent)} "
                            f"field (its keys: {sorted(record)})",
                            fix=f"give records of one of these shapes: {'; '.join(shapes)}")


def pair_turns(record: dict, index: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) turns of one preference pair of any accepted shape."""
    _missing(record, ("chosen", "rejected"), PAIR_SHAPES, index)
    chosen = _as_turns(record["chosen"], "chosen", "assistant")
    rejected = _as_turns(record["rejected"], "rejected", "assistant")
    if "prompt" in record and record["prompt"] is not None:
        return _as_turns(record["prompt"], "prompt", "user"), chosen, rejected
    prompt, chosen, rejected = _shared_prompt(chosen, rejected)
    if not prompt or not chosen or not rejected:
        raise InvalidOption(f"Reading preference record {index}", found="no 'prompt' field, and 'chosen' and "
                            "'rejected' do not share opening turns followed by different answers",
                            fix=f"give records of one of these shapes: {'; '.join(PAIR_SHAPES)}")
    return prompt, chosen, rejected


class Renderer:
    """Prompt and answer text from turns: the chat template's, split where the prompt's generation prompt ends."""

    def __init__(self, tokenizer, chat_template: bool | None = None):
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat_template and not has_template:
            raise InvalidOption("chat_template=True", found=f"{type(tokenizer).__name__} has no chat_template",
                                fix="set tokenizer.chat_template, or pass chat_template=False for plain text")
        self.tokenizer = tokenizer
        self.templated = has_template if chat_template is None else chat_template

    def prompt(self, turns: list[dict]) -> str:
        from fastload.data import render

        if not self.templated:
            return "\n".join(t["content"] for t in turns)
        return render(self.tokenizer, turns, add_generation_prompt=True)

    def answer(self, prompt: list[dict], answer: list[dict], prompt_text: str) -> str:
        """The answer's text as the template writes it after the prompt, ending at its end-of-turn token."""
        from fastload.data import render

        if not self.templated:
            return "".join(t["content"] for t in answer)
        full = render(self.tokenizer, prompt + answer)
        if not full.startswith(prompt_text):
            raise InvalidOption("Applying the chat template to a preference record", found="the template renders the "
                                "prompt differently when an answer follows it", fix="give the records as plain "
                                "strings with chat_template=False, or fix tokenizer.chat_template")
        text = full[len(prompt_text):]
        eos = self.tokenizer.eos_token
        # the template's newline after its end-of-turn token would put the EOS mid-answer for TRL's check
        return text.rstrip() if eos and text.rstrip().endswith(eos) else text


def pair_rows(records, renderer: Renderer) -> list[dict[str, str]]:
    """Preference pairs -> {"prompt", "chosen", "rejected"} rendered strings."""
    rows = []
    for i, record in enumerate(records):
        prompt, chosen, rejected = pair_turns(record, i)
        prompt_text = renderer.prompt(prompt)
        rows.append({"prompt": prompt_text, "chosen": renderer.answer(prompt, chosen, prompt_text),
                     "rejected": renderer.answer(prompt, rejected, prompt_text)})
    return rows


def _label(value, index: int) -> bool:
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise InvalidOption(f"Reading KTO record {index}", found=f"label {value!r}",
                        fix="label is true (a desirable completion) or false (an undesirable one)")


def labelled_rows(records, renderer: Renderer) -> list[dict]:
    """KTO records -> {"prompt", "completion", "label"}; a preference pair gives one of each label."""
    rows = []
    for i, record in enumerate(records):
        if isinstance(record, dict) and "chosen" in record and "completion" not in record:
            pair = pair_rows([record], renderer)[0]
            rows += [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
                     {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]
            continue
        _missing(record, ("prompt", "completion", "label"), LABELLED_SHAPES, i)
        prompt = _as_turns(record["prompt"], "prompt", "user")
        prompt_text = renderer.prompt(prompt)
        completion = _as_turns(record["completion"], "completion", "assistant")
        rows.append({"prompt": prompt_text, "completion": renderer.answer(prompt, completion, prompt_text),
                     "label": _label(record["label"], i)})
    return rows


def to_dataset(records, tokenizer, labelled: bool, chat_template: bool | None = None):
    """The records as a datasets.Dataset of rendered strings (a Dataset's rows are read as dicts)."""
    from datasets import Dataset

    if records is None:
        return None
    records = list(records)
    if not records:
        raise InvalidOption("Preference training", found="no records", fix="give at least one record")
    renderer = Renderer(tokenizer, chat_template)
    rows = labelled_rows(records, renderer) if labelled else pair_rows(records, renderer)
    return Dataset.from_list(rows)


# -- arguments --------------------------------------------------------------------------------------------------

def preference_arguments(method: PreferenceMethod, output_dir, model=None, **kwargs: Any):
    """The method's TRL config with fastload's defaults (8-bit AdamW, non-reentrant checkpointing, the model's
    precision, max_length = model.max_seq_length); any field given wins.

    Raises:
        InvalidOption: a keyword that is not a field of the method's config.
    """
    from fastload.train.trainer import TRAINING_DEFAULTS, current_checkpointing_names, loader_flags, precision_flags

    _, config_cls = method.classes()
    options = {**copy.deepcopy(TRAINING_DEFAULTS), **precision_flags(model), **loader_flags(),
               "learning_rate": PREFERENCE_LR, **method.defaults}
    if getattr(model, "max_seq_length", None):
        options["max_length"] = model.max_seq_length
    options.update(kwargs)
    options = current_checkpointing_names(config_cls, options)
    known = {f.name for f in dataclasses.fields(config_cls) if f.init}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InvalidOption(f"{method.name} arguments ({', '.join(f'{k}=...' for k in unknown)})",
                            found=f"not field(s) of {config_cls.__name__}",
                            fix=f"use {config_cls.__name__} field names (see TRL's documentation)")
    return config_cls(output_dir=str(output_dir), **options)


def _as_config(args, config_cls, method: PreferenceMethod):
    """A plain TrainingArguments becomes the method's config carrying the same settings."""
    if isinstance(args, config_cls):
        return args
    values = {k: v for k, v in args.to_dict().items()
              if k in {f.name for f in dataclasses.fields(config_cls) if f.init}}
    values["hub_token"] = args.hub_token  # to_dict hides it
    return config_cls(**{**method.defaults, **values})


# -- the builders ---------------------------------------------------------------------------------------------

def build(method_name: str, model, tokenizer, data, args=None, eval_data=None, chat_template: bool | None = None,
          **kwargs: Any):
    """The TRL trainer of a preference method around the loaded model, with fastload's defaults.

    Args:
        method_name: "dpo", "orpo", "kto" or "simpo".
        model, tokenizer: from FastModel.from_pretrained (LoRA adapters required: only they train).
        data / eval_data: records (see the module docstring), a list or a datasets.Dataset.
        args: None for fastload's defaults, or the method's TRL config (a TrainingArguments is converted).
        chat_template: None renders records with the tokenizer's chat template when it has one; False keeps the
            strings as given.
        **kwargs: fields of the method's config (beta=0.1, max_steps=10...) override; the rest go to the trainer.

    Returns:
        TRL's trainer (DPOTrainer, ORPOTrainer, KTOTrainer, CPOTrainer with loss "simpo").

    Raises:
        AdapterError: the model has no LoRA adapters.
        InvalidOption: a record lacking a field the method needs, or an unknown config field.
    """
    from fastload.train.checkpointing import for_training
    from fastload.train.lora import untrained_adapter
    from fastload.train.trainer import (
        add_fastload_parts,
        restore_adapter_dtypes,
        saving_locally,
        steady_switches,
    )

    method = PREFERENCE_METHODS[method_name]
    if not getattr(model, "peft_config", None):
        raise AdapterError(f"{method.name.upper()} training", found="the model has no LoRA adapters: the 4-bit "
                           "weights cannot train", fix="load with FastModel.from_pretrained(...) (LoRA is on by "
                           "default) or add adapters with FastModel.get_peft_model(model)")
    trainer_cls, config_cls = method.classes()
    fields = {k: kwargs.pop(k) for k in list(kwargs) if k in {f.name for f in dataclasses.fields(config_cls)}}
    if args is None:
        from fastload.train.trainer import DEFAULT_OUTPUT_DIR

        args = preference_arguments(method, fields.pop("output_dir", DEFAULT_OUTPUT_DIR), model=model, **fields)
    else:
        args = _as_config(args, config_cls, method)
        args = dataclasses.replace(args, **fields) if fields else args
    _non_reentrant(args)
    train = to_dataset(data, tokenizer, method.labelled, chat_template)
    evaluation = to_dataset(eval_data, tokenizer, method.labelled, chat_template)
    for_training(model)
    fresh = untrained_adapter(model)
    had_reference = REFERENCE_ADAPTER in model.peft_config
    trainer_kwargs = add_fastload_parts(model, args, kwargs)
    dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    trainer = steady_switches(saving_locally(trainer_cls))(model=model, args=args, train_dataset=train,
                                                         eval_dataset=evaluation, processing_class=tokenizer,
                                                         **trainer_kwargs)
    restore_adapter_dtypes(model, dtypes)
    if method.reference and not had_reference:
        _settle_reference(model, fresh)
    return trainer


def _non_reentrant(args) -> None:
    if args.gradient_checkpointing:
        kw = dict(args.gradient_checkpointing_kwargs or {})
        kw.setdefault("use_reentrant", False)
        args.gradient_checkpointing_kwargs = kw


def _settle_reference(model, fresh: bool) -> None:
    """Drop TRL's frozen copy of a fresh adapter: with lora_B all zero it computes the base model, which TRL then
    gets by disabling the adapter, one LoRA pass cheaper. A trained adapter's copy stays: it is the reference."""
    if REFERENCE_ADAPTER not in model.peft_config:
        return
    if fresh:
        model.delete_adapter(REFERENCE_ADAPTER)
        logger.info("reference model: the 4-bit base with the adapter disabled (no copy of the model)")
    else:
        logger.info("reference model: the 4-bit base with a frozen copy of the adapter as it was before training "
                    "(TRL's 'ref' adapter; no copy of the base)")


def build_dpo(model, tokenizer, data, args=None, **kwargs: Any):
    """DPO (TRL's DPOTrainer): see build."""
    return build("dpo", model, tokenizer, data, args=args, **kwargs)


def build_orpo(model, tokenizer, data, args=None, **kwargs: Any):
    """ORPO (TRL's experimental ORPOTrainer), reference-free: see build."""
    return build("orpo", model, tokenizer, data, args=args, **kwargs)


def build_kto(model, tokenizer, data, args=None, **kwargs: Any):
    """KTO (TRL's KTOTrainer) on labelled completions or split preference pairs: see build."""
    return build("kto", model, tokenizer, data, args=args, **kwargs)


def build_simpo(model, tokenizer, data, args=None, **kwargs: Any):
    """SimPO (TRL's experimental CPOTrainer, loss_type="simpo", cpo_alpha=0), reference-free: see build."""
    return build("simpo", model, tokenizer, data, args=args, **kwargs)
