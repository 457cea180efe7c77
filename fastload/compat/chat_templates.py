"""Unsloth's chat-template helpers: get_chat_template, train_on_responses_only, standardize_sharegpt.

The templates are data (chat_templates.toml beside this file). train_on_responses_only works on the token ids a
trainer already holds: every label outside an assistant turn becomes -100, so the loss is the answers' only.
"""

from __future__ import annotations

import functools
import json
import tomllib
from importlib import resources
from typing import Any

from fastload._log import logger
from fastload.compat.options import log_once
from fastload.compat.trl_install import install_trl_compat
from fastload.data import IGNORE_INDEX, ROLE_ALIASES
from fastload.errors import InvalidOption

DEFAULT_MAPPING = {"role": "role", "content": "content", "user": "user", "assistant": "assistant"}
SHAREGPT_MAPPING = {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}


@functools.lru_cache(maxsize=1)
def templates() -> dict[str, dict[str, Any]]:
    """Every template of chat_templates.toml by name, aliases included (names lower-case)."""
    text = resources.files(__package__).joinpath("chat_templates.toml").read_text(encoding="utf-8")
    table = tomllib.loads(text)
    named = {}
    for name, spec in table.items():
        for alias in (name, name.replace("_", "."), *spec.get("aliases", [])):
            named[alias.lower()] = {**spec, "name": name}
    return named


def template_names() -> list[str]:
    return sorted(templates())


def find_template(chat_template: str) -> dict[str, Any]:
    spec = templates().get(str(chat_template).lower())
    if spec is None:
        import difflib

        close = difflib.get_close_matches(str(chat_template).lower(), template_names(), n=3)
        raise InvalidOption(f"get_chat_template(chat_template={chat_template!r})", found="no template of that name",
                            fix=f"did you mean {', '.join(close)}?" if close else
                                f"use one of: {', '.join(sorted({s['name'] for s in templates().values()}))}, or "
                                "pass (jinja_template, stop_token)")
    return spec


def render_template(spec: dict[str, Any], mapping: dict[str, str], system_message: str | None) -> str:
    """The template's Jinja with its placeholders filled in (as string literals, so any text is safe)."""
    keys = {**DEFAULT_MAPPING, **mapping}
    system = spec.get("system_message", "") if system_message is None else system_message
    values = {"__ROLE__": keys["role"], "__CONTENT__": keys["content"], "__USER__": keys["user"],
              "__ASSISTANT__": keys["assistant"], "__SYSTEM__": keys.get("system", "system"),
              "__SYSTEM_MESSAGE__": system}
    text = spec["template"]
    for placeholder, value in values.items():
        text = text.replace(placeholder, json.dumps(value))
    return text


def get_chat_template(tokenizer, chat_template: str | tuple = "chatml", mapping: dict[str, str] | None = None,
                      map_eos_token: bool = True, system_message: str | None = None, **unused: Any):
    """Give the tokenizer a chat template by name (Unsloth's get_chat_template).

    Args:
        tokenizer: the tokenizer from from_pretrained; changed in place and returned.
        chat_template: a name ("chatml", "llama-3", "llama-3.1", "zephyr", "alpaca", "mistral", "gemma", "phi-3",
            "qwen-2.5", ...: fastload.chat_templates.template_names()) or a (jinja_template, stop_token) pair.
        mapping: the message keys and role names of the data, e.g. ShareGPT's
            {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}.
        map_eos_token: make the template's end-of-turn token the tokenizer's eos_token, so generation stops at
            the end of the answer (when the tokenizer has that token).
        system_message: the system message for conversations without one (None: the template's default).

    Returns:
        The tokenizer.

    Raises:
        InvalidOption: an unknown template name.
    """
    install_trl_compat()
    for name in sorted(unused):
        log_once("get_chat_template: Unsloth option %s accepted and not used here", name)
    if isinstance(chat_template, (tuple, list)):
        jinja, stop = chat_template
        spec = {"name": "custom", "template": jinja, "stop": stop}
        tokenizer.chat_template = jinja
    else:
        spec = find_template(chat_template)
        tokenizer.chat_template = render_template(spec, mapping or {}, system_message)
    if map_eos_token:
        _map_eos(tokenizer, spec)
    logger.info("chat template: %s%s", spec["name"], f" (keys {mapping})" if mapping else "")
    return tokenizer


def _map_eos(tokenizer, spec: dict[str, Any]) -> None:
    stop = spec.get("stop", "eos")
    if stop in ("eos", tokenizer.eos_token):
        return
    if tokenizer.convert_tokens_to_ids(stop) in (None, tokenizer.unk_token_id):
        log_once("the %s template ends turns with %s, which this tokenizer has no token for: eos stays %s",
                 spec["name"], stop, tokenizer.eos_token)
        return
    logger.info("eos_token: %s (the %s template's end of turn; was %s)", stop, spec["name"], tokenizer.eos_token)
    tokenizer.eos_token = stop


# -- ShareGPT -> role/content -------------------------------------------------------------------------------------

def standardize_sharegpt(dataset, aliases_for_system=None, aliases_for_user=None, aliases_for_assistant=None):
    """ShareGPT conversations ({"from": "human"|"gpt", "value"}) -> {"role": "user"|"assistant", "content"}.

    Args:
        dataset: a datasets.Dataset or a list of records with a "conversations" column.
        aliases_for_*: more speaker names for that role (fastload.data.ROLE_ALIASES are always known).

    Returns:
        The same kind of object with "conversations" in role/content form.
    """
    roles = dict(ROLE_ALIASES)
    for role, extra in (("system", aliases_for_system), ("user", aliases_for_user),
                        ("assistant", aliases_for_assistant)):
        roles.update({str(name).lower(): role for name in extra or []})

    def convert(conversation: list[dict]) -> list[dict]:
        out = []
        for turn in conversation:
            speaker = str(turn.get("from", turn.get("role"))).lower()
            if speaker not in roles:
                raise InvalidOption("standardize_sharegpt", found=f"a speaker {speaker!r}",
                                    fix="pass aliases_for_user=[...] / aliases_for_assistant=[...] naming it")
            out.append({"role": roles[speaker], "content": turn.get("value", turn.get("content"))})
        return out

    if isinstance(dataset, list):
        return [{**record, "conversations": convert(record["conversations"])} for record in dataset]
    return dataset.map(lambda batch: {"conversations": [convert(c) for c in batch["conversations"]]}, batched=True)


# -- responses-only labels ----------------------------------------------------------------------------------------

def template_parts(tokenizer) -> tuple[str, str]:
    """(instruction_part, response_part) of the tokenizer's chat template: the template of ours it equals, else
    read off renderings of a probe conversation (the text opening a user turn, the generation prompt)."""
    from fastload.data import render

    current = getattr(tokenizer, "chat_template", None)
    for spec in templates().values():
        for mapping in (DEFAULT_MAPPING, SHAREGPT_MAPPING):
            if current == render_template(spec, mapping, None) and spec["name"] != "mistral":
                return spec["instruction_part"], spec["response_part"]
    user, answer, again = ("\x01" * 3), ("\x02" * 3), ("\x03" * 3)
    one = [{"role": "user", "content": user}]
    prompt = render(tokenizer, one, add_generation_prompt=True)
    response_part = prompt[len(render(tokenizer, one)):]
    two = render(tokenizer, [*one, {"role": "assistant", "content": answer}])
    three = render(tokenizer, [*one, {"role": "assistant", "content": answer}, {"role": "user", "content": again}])
    shared = 0
    while shared < min(len(two), len(three)) and two[shared] == three[shared]:
        shared += 1
    instruction_part = three[shared:three.index(again)]
    if not response_part.strip() or not instruction_part.strip():
        raise InvalidOption("train_on_responses_only: finding where turns start in the chat template",
                            found=f"instruction_part={instruction_part!r}, response_part={response_part!r}",
                            fix="pass instruction_part=... and response_part=... (the text opening a user turn "
                                "and an assistant turn)")
    return instruction_part, response_part


def _part_ids(tokenizer, part: str) -> list[list[int]]:
    """The token ids the part can have inside a text: as tokenized alone, and without its edge whitespace (BPE
    merges a leading or trailing newline with its neighbours)."""
    variants = []
    for text in (part, part.strip()):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids and ids not in variants:
            variants.append(ids)
    return variants


def _find_all(ids: list[int], variants: list[list[int]]) -> list[tuple[int, int]]:
    """(start, end) of every occurrence of any variant in ids, earliest and longest first."""
    found = []
    for i in range(len(ids)):
        for pattern in variants:
            if ids[i:i + len(pattern)] == pattern:
                found.append((i, i + len(pattern)))
                break
    return found


def response_labels(input_ids: list[int], instruction_ids: list[list[int]], response_ids: list[list[int]]) -> list[int]:
    """Labels that keep only the tokens after each response_part up to the next instruction_part."""
    labels = [IGNORE_INDEX] * len(input_ids)
    starts = sorted(s for s, _ in _find_all(input_ids, instruction_ids))
    for _, end in _find_all(input_ids, response_ids):
        stop = next((s for s in starts if s >= end), len(input_ids))
        labels[end:stop] = input_ids[end:stop]
    return labels


def train_on_responses_only(trainer, instruction_part: str | None = None, response_part: str | None = None,
                            force_match: bool = True, tokenizer=None, return_function: bool = False,
                            num_proc: int | None = None):
    """Make the trainer learn the assistant's turns only: labels of every other token become -100.

    Args:
        trainer: a transformers Trainer / TRL SFTTrainer whose train_dataset (and eval_dataset) is tokenized.
        instruction_part: the text opening a user turn (e.g. "<|im_start|>user\\n"); with response_part, None reads
            both off the tokenizer's chat template.
        response_part: the text opening an assistant turn (e.g. "<|im_start|>assistant\\n").
        force_match: kept for Unsloth's signature (matching is by token ids, with and without edge whitespace).
        tokenizer: defaults to the trainer's.
        return_function: return the function that maps {"input_ids": [...]} -> {"labels": [...]} instead.
        num_proc: processes for datasets.map.

    Returns:
        The trainer, its datasets relabelled (examples left without any answer token are dropped, logged).

    Raises:
        InvalidOption: the datasets are not tokenized, or no answer is found in any example.
    """
    tokenizer = tokenizer or getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    if instruction_part is None or response_part is None:
        found = template_parts(tokenizer)
        instruction_part = instruction_part if instruction_part is not None else found[0]
        response_part = response_part if response_part is not None else found[1]
    instruction_ids, response_ids = _part_ids(tokenizer, instruction_part), _part_ids(tokenizer, response_part)

    def relabel(batch: dict) -> dict:
        return {"labels": [response_labels(list(ids), instruction_ids, response_ids) for ids in batch["input_ids"]]}

    if return_function:
        return relabel
    for attribute in ("train_dataset", "eval_dataset"):
        dataset = getattr(trainer, attribute, None)
        if dataset is not None:
            setattr(trainer, attribute, _relabel(dataset, relabel, attribute, response_part, num_proc))
    _use_label_collator(trainer, tokenizer)
    logger.info("training on responses only: labels after %r up to the next %r", response_part, instruction_part)
    return trainer


def _relabel(dataset, relabel, attribute: str, response_part: str, num_proc):
    columns = getattr(dataset, "column_names", None)
    if isinstance(dataset, dict) or columns is None or "input_ids" not in columns:
        raise InvalidOption(f"train_on_responses_only on trainer.{attribute}", found="it holds no input_ids column",
                            fix="build the trainer first (SFTTrainer tokenizes its dataset), then call this")
    dataset = dataset.map(relabel, batched=True, num_proc=num_proc)
    kept = dataset.filter(lambda ex: any(label != IGNORE_INDEX for label in ex["labels"]), num_proc=num_proc)
    if len(kept) == 0:
        raise InvalidOption(f"train_on_responses_only on trainer.{attribute}",
                            found=f"no example contains the response part {response_part!r}",
                            fix="pass the response_part your chat template writes before an answer")
    if len(kept) < len(dataset):
        logger.info("train_on_responses_only: %d of %d examples in %s have no answer left (cut by max length?) "
                    "and are dropped", len(dataset) - len(kept), len(dataset), attribute)
    return kept


def _use_label_collator(trainer, tokenizer) -> None:
    """transformers' DataCollatorForLanguageModeling rebuilds labels from input_ids: swap in one that keeps them."""
    from transformers import DataCollatorForLanguageModeling

    if isinstance(getattr(trainer, "data_collator", None), DataCollatorForLanguageModeling):
        from fastload.data import Collator

        trainer.data_collator = Collator(tokenizer)
        logger.info("data collator: fastload's Collator (keeps the responses-only labels)")
