"""Sequence classification (or a reward head): transformers' Trainer over `text` / `label` records.

The model comes from FastModel.from_pretrained(..., task="sequence-classification", num_labels=N): LoRA on the 4-bit
body, the `score` head trained in full in fp32. Labels are class indices, or names found in config.label2id.
"""

from __future__ import annotations

from typing import Any

from fastload.errors import InvalidOption
from fastload.model_state import state_of

SHAPE = "text / label (a class index 0..num_labels-1, or a name in model.config.label2id)"


def _label_id(value, label2id: dict, num_labels: int, index: int) -> int:
    if isinstance(value, str) and value in label2id:
        return int(label2id[value])
    if isinstance(value, (int, float)) and not isinstance(value, bool) and int(value) == value \
            and 0 <= int(value) < num_labels:
        return int(value)
    names = f" or one of {sorted(label2id)}" if label2id else ""
    raise InvalidOption(f"Reading classification record {index}", found=f"label {value!r}",
                        fix=f"give a class index 0..{num_labels - 1}{names}")


def _regression_target(value, index: int) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise InvalidOption(f"Reading reward record {index}", found=f"label {value!r}",
                        fix="a head of one label (a reward model) takes a number as label")


def tokenize_records(records, tokenizer, model) -> list[dict]:
    """`text` / `label` records -> input_ids, attention_mask, labels (truncated at model.max_seq_length).

    Raises:
        InvalidOption: a record without `text` or `label`, or a label outside the classes.
    """
    config = model.config
    num_labels = config.num_labels
    label2id = {k: v for k, v in (getattr(config, "label2id", None) or {}).items() if not k.startswith("LABEL_")}
    limit = getattr(model, "max_seq_length", None)
    rows = []
    for i, record in enumerate(records):
        absent = [k for k in ("text", "label") if not isinstance(record, dict) or record.get(k) is None]
        if absent:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise InvalidOption(f"Reading classification record {i}", found=f"no {', '.join(map(repr, absent))} "
                                f"field ({keys})", fix=f"give records of the shape {SHAPE}")
        encoded = tokenizer(str(record["text"]), truncation=bool(limit), max_length=limit)
        label = _regression_target(record["label"], i) if num_labels == 1 else \
            _label_id(record["label"], label2id, num_labels, i)
        rows.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": label})
    if not rows:
        raise InvalidOption("Classification training", found="no records", fix="give at least one record")
    return rows


def build(model, tokenizer, data, args=None, eval_data=None, **kwargs: Any):
    """transformers' Trainer for a classifier with fastload's defaults (8-bit AdamW, checkpointing kept, the
    model's precision).

    Args:
        model, tokenizer: from FastModel.from_pretrained(..., task="sequence-classification", num_labels=N).
        data / eval_data: `text` / `label` records (see SHAPE); tokenized examples with input_ids pass unchanged.
        args: None for fastload's defaults (fastload.train.trainer.training_arguments) or a TrainingArguments.
        **kwargs: TrainingArguments fields override; the rest go to the Trainer.

    Returns:
        transformers' Trainer.

    Raises:
        InvalidOption: the model is not a classifier, or a record lacks `text` / `label`.
    """
    import dataclasses

    from transformers import DataCollatorWithPadding, Trainer

    from fastload.load.task import SEQUENCE_CLASSIFICATION
    from fastload.train.checkpointing import for_training
    from fastload.train.trainer import (
        DEFAULT_OUTPUT_DIR,
        add_fastload_parts,
        argument_fields,
        saving_locally,
        training_arguments,
    )

    if state_of(model, create=False).task != SEQUENCE_CLASSIFICATION:
        raise InvalidOption("get_trainer(method='classify')", found="the model is not a sequence classifier",
                            fix="load it with FastModel.from_pretrained(name, task='sequence-classification', "
                                "num_labels=N)")
    fields = {k: kwargs.pop(k) for k in list(kwargs) if k in argument_fields(False)}
    if args is None:
        args = training_arguments(fields.pop("output_dir", DEFAULT_OUTPUT_DIR), model=model, **fields)
    elif fields:
        args = dataclasses.replace(args, **fields)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    train = _examples(data, tokenizer, model)
    evaluation = _examples(eval_data, tokenizer, model)
    for_training(model)
    trainer_kwargs = add_fastload_parts(model, args, kwargs)
    trainer_kwargs.setdefault("data_collator", DataCollatorWithPadding(tokenizer))
    return saving_locally(Trainer)(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                                   processing_class=tokenizer, **trainer_kwargs)


def _examples(data, tokenizer, model):
    if data is None:
        return None
    names = getattr(data, "column_names", None)
    if names is not None and "input_ids" in names:
        return data
    return tokenize_records(list(data), tokenizer, model)
