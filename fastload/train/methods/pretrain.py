"""Continued pretraining on raw text: documents tokenized with EOS between them, cut into rows of max_seq_length and
packed (fastload.data.pack), every token trained. Optionally the embeddings and lm_head train in full precision
with a learning rate of their own (new domain words need their rows moved further than LoRA's rate), and new tokens
join the tokenizer with their embedding rows started at the mean embedding.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import weakref
from pathlib import Path
from typing import Any, Iterable, Sequence

from fastload._log import logger
from fastload.errors import InvalidOption

DEFAULT_EMBEDDING_LR_RATIO = 0.1  # embeddings at a tenth of the LoRA rate when no embedding_learning_rate is given


# -- text -> packed rows ------------------------------------------------------------------------------------------

def read_texts(data) -> list[str]:
    """Documents from: a .txt file or a folder of them (one document per file), a .jsonl/.json/.csv file of records
    with a `text` field, a list of strings, or a list of such records.

    Raises:
        InvalidOption: a missing path, a record without `text`, no text at all.
    """
    if isinstance(data, (str, os.PathLike)):
        return _read_path(Path(data).expanduser())
    texts = []
    for i, item in enumerate(data):
        text = item if isinstance(item, str) else item.get("text") if isinstance(item, dict) else None
        if not isinstance(text, str):
            found = f"keys {sorted(item)}" if isinstance(item, dict) else f"a {type(item).__name__}"
            raise InvalidOption(f"Reading pretraining document {i}", found=found,
                                fix="give strings, or records with a 'text' field")
        texts.append(text)
    return _non_empty(texts, "the data given")


def _read_path(path: Path) -> list[str]:
    from fastload.data import load_records

    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise InvalidOption(f"Reading text from {path}", found="no .txt file in the folder",
                                fix="put the documents in .txt files, or pass one file")
        return _non_empty([f.read_text(encoding="utf-8") for f in files], str(path))
    if path.suffix.lower() in (".txt", ".md", ".text"):
        if not path.is_file():
            raise InvalidOption(f"Reading text from {path}", found="no such file", fix="check the path")
        return _non_empty([path.read_text(encoding="utf-8")], str(path))
    return read_texts(load_records(path))


def _non_empty(texts: list[str], where: str) -> list[str]:
    kept = [t for t in texts if t.strip()]
    if not kept:
        raise InvalidOption(f"Reading pretraining text from {where}", found="no text", fix="give non-empty documents")
    return kept


def pretraining_rows(tokenizer, texts: Sequence[str], max_seq_length: int) -> list[dict[str, list[int]]]:
    """Documents -> packed rows of at most max_seq_length tokens, labels on every token.

    Each document ends with EOS (the model learns where a text stops) and is cut into pieces of max_seq_length;
    pack fills rows with the pieces, position ids restarting per piece so no piece attends to another.
    """
    from fastload.data import pack

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pieces = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"] + eos
        pieces += [{"input_ids": ids[i:i + max_seq_length]} for i in range(0, len(ids), max_seq_length)]
    return pack([p for p in pieces if len(p["input_ids"]) > 1], max_seq_length)


# -- new tokens and trainable embeddings --------------------------------------------------------------------------

def add_tokens(model, tokenizer, new_tokens: Iterable[str]) -> int:
    """Add tokens to the tokenizer and rows for them to the embeddings (and an untied lm_head), each new row the mean
    of the old ones: a random row would make the new tokens' logits arbitrary, the mean keeps them ordinary.

    Returns:
        How many tokens were new.
    """
    import torch

    added = tokenizer.add_tokens(list(new_tokens))
    if not added:
        return 0
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    old = base.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= old:  # the vocabulary already has spare rows (padded to a multiple)
        return added
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for layer in {id(m): m for m in (base.get_input_embeddings(), base.get_output_embeddings()) if m}.values():
            layer.weight[old:] = layer.weight[:old].float().mean(0).to(layer.weight.dtype)
    from fastload.engine import reapply_engine

    reapply_engine(base)  # the resized table is a new GPU tensor: host_embedding moves it again
    logger.info("added %d tokens; embeddings resized %d -> %d rows (new rows: the mean embedding)", added, old,
                len(tokenizer))
    return added


def embedding_module_names(model) -> list[str]:
    """The names of the input embedding and lm_head inside the transformers model (embed_tokens, lm_head ...)."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    wanted = {id(base.get_input_embeddings()): None, id(base.get_output_embeddings()): None}
    names = [name for name, m in base.named_modules() if id(m) in wanted and name]
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def make_embeddings_trainable(model) -> list:
    """Make the embeddings and lm_head trainable in full precision (peft's modules_to_save: a trained copy, saved
    with the adapter), tied again where the model ties them. Returns the trained embedding parameters.

    Raises:
        InvalidOption: the model has no LoRA adapter (peft) to carry the trained copies.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner
    from peft.utils.other import set_additional_trainable_modules

    if not isinstance(model, PeftModel):
        raise InvalidOption("Training the embeddings (train_embeddings=True)", found="the model has no LoRA adapter",
                            fix="load with LoRA (FastModel.from_pretrained's default) or call get_peft_model first")
    adapter = model.active_adapter
    config = model.peft_config[adapter]
    names = embedding_module_names(model)
    config.modules_to_save = sorted(set(config.modules_to_save or []) | set(names))
    tied = model.get_base_model().config.get_text_config().tie_word_embeddings
    if tied and hasattr(config, "ensure_weight_tying"):  # saved with the adapter: peft ties the copies on reload
        config.ensure_weight_tying = True
    set_additional_trainable_modules(model=model.base_model, peft_config=config,
                                     model_config=BaseTuner.get_model_config(model), adapter_name=adapter)
    base = model.get_base_model()
    embed, head = base.get_input_embeddings(), base.get_output_embeddings()
    trained = [getattr(m, "modules_to_save")[adapter].weight for m in (embed, head)
               if m is not None and hasattr(m, "modules_to_save")]
    if tied and len(trained) == 2:
        head.modules_to_save[adapter].weight = embed.modules_to_save[adapter].weight  # one trained matrix, as before
        trained = trained[:1]
    for p in trained:
        p.data = p.data.float()
        p.requires_grad_(True)
    trained_copies_in_compute_dtype(model)
    logger.info("training %s in full precision (modules_to_save)", ", ".join(names))
    return trained


def trained_copies_in_compute_dtype(model) -> None:
    """Trained embedding copies (modules_to_save, fp32 for the optimizer) meet the layers in the dtype the model
    computes in: the input embedding's copy hands over its rows in the frozen embedding's dtype, the head's copy
    takes the hidden states in its own (logits in fp32). Outside autocast (generation, a plain forward) fp32 rows
    otherwise fail in 16-bit layers that do not cast their input (an MoE router's linear) and 16-bit hidden states
    in the fp32 head. Gradients still reach the fp32 copies. Called where copies are made and where saved ones are
    loaded; each copy hooked once."""
    import torch

    from fastload.load.task import input_in_own_dtype

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for module, rows in ((base.get_input_embeddings(), True), (base.get_output_embeddings(), False)):
        dtype = getattr(getattr(getattr(module, "original_module", None), "weight", None), "dtype", None)
        if dtype not in (torch.float16, torch.bfloat16):
            continue
        for copy in getattr(module, "modules_to_save", {}).values():
            if not rows:
                input_in_own_dtype(copy)
            elif copy not in _ROWS_CAST:
                copy.register_forward_hook(functools.partial(_output_to, dtype))
                _ROWS_CAST.add(copy)


_ROWS_CAST: weakref.WeakSet = weakref.WeakSet()  # embedding copies given the output cast


def _output_to(dtype, module, args, output):
    return output.to(dtype) if output.is_floating_point() and output.dtype != dtype else output


def parameter_groups(model, learning_rate: float, embedding_learning_rate: float, weight_decay: float) -> list[dict]:
    """The LoRA parameters at learning_rate (transformers' decay rule), the embeddings at their own rate."""
    from fastload.train.optim import parameter_groups as lora_groups
    from fastload.train.optim import trained_embeddings

    embeddings = {id(p) for p in trained_embeddings(model)}
    embeddings |= {id(p) for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n}
    groups = []
    for group in lora_groups(model, weight_decay):
        group["params"] = [p for p in group["params"] if id(p) not in embeddings]
        groups.append({**group, "lr": learning_rate})
    params = [p for p in model.parameters() if id(p) in embeddings]
    groups.append({"params": params, "lr": embedding_learning_rate, "weight_decay": 0.0})
    return groups


def embedding_optimizer(model, args, embedding_learning_rate: float):
    """fastload's AdamW8bit with the embeddings in a group of their own (32-bit state, their own rate)."""
    from fastload.train.adamw8bit import AdamW8bitNoSync

    groups = parameter_groups(model, args.learning_rate, embedding_learning_rate, args.weight_decay)
    logger.info("optimizer: AdamW8bit, LoRA at lr %g, embeddings at lr %g", args.learning_rate,
                embedding_learning_rate)
    return AdamW8bitNoSync(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                           eps=args.adam_epsilon, full_precision=groups[-1]["params"])


# -- the trainer --------------------------------------------------------------------------------------------------

def build(model, tokenizer, data, args=None, train_embeddings: bool = False,
          embedding_learning_rate: float | None = None, new_tokens: Sequence[str] = (),
          max_seq_length: int | None = None, **kwargs: Any):
    """transformers' Trainer for continued pretraining with fastload's defaults.

    Args:
        model: the model from FastModel.from_pretrained (LoRA on).
        tokenizer: its tokenizer (new_tokens are added to it).
        data: a .txt file or folder of them, a .jsonl/.json/.csv of records with `text`, strings, or such records.
        args: TrainingArguments (None: fastload's training_arguments with the fields among kwargs).
        train_embeddings: train the embeddings and lm_head too (full precision, saved with the adapter).
        embedding_learning_rate: their learning rate (default: a tenth of the LoRA rate).
        new_tokens: tokens to add; implies train_embeddings (their rows must learn).
        max_seq_length: row length (default: the model's max_seq_length).
        **kwargs: TrainingArguments fields and Trainer arguments.

    Returns:
        The Trainer; `.train()` runs it.

    Raises:
        InvalidOption: no text, bad options.
    """
    from fastload.train.trainer import argument_fields, get_trainer, training_arguments

    limit = max_seq_length or getattr(model, "max_seq_length", None) or tokenizer.model_max_length
    texts = read_texts(data)
    if new_tokens:
        add_tokens(model, tokenizer, new_tokens)
        train_embeddings = True
    fields = {k: kwargs.pop(k) for k in list(kwargs) if k in argument_fields(False)}
    if args is None:
        args = training_arguments(model=model, **fields)
    elif fields:
        args = dataclasses.replace(args, **fields)
    if train_embeddings and "optimizers" not in kwargs:
        make_embeddings_trainable(model)
        rate = embedding_learning_rate if embedding_learning_rate is not None else \
            args.learning_rate * DEFAULT_EMBEDDING_LR_RATIO
        kwargs["optimizers"] = (embedding_optimizer(model, args, rate), None)
    elif embedding_learning_rate is not None:
        raise InvalidOption(f"embedding_learning_rate={embedding_learning_rate}", found="the embeddings are not "
                            "trained", fix="pass train_embeddings=True as well")
    rows = pretraining_rows(tokenizer, texts, limit)
    logger.info("continued pretraining: %d documents -> %d packed rows of up to %d tokens", len(texts), len(rows),
                limit)
    return get_trainer(model, tokenizer, rows, args=args, **kwargs)

