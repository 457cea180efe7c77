"""Training data: records of the common shapes -> chat messages -> token ids with responses-only labels, packing,
and the collator that pads a batch.

Nothing here hard-codes a chat format: assistant spans are found by rendering the tokenizer's own chat template on
growing prefixes of the conversation, so ChatML, Llama-3, Gemma, Mistral and any other template work alike.
"""

from __future__ import annotations

import bisect
import csv
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from fastload.errors import InvalidOption

IGNORE_INDEX = -100  # what transformers' cross-entropy skips

# ShareGPT and friends name their speakers differently; the chat templates want these three (plus tool).
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                "model": "assistant", "chatgpt": "assistant", "system": "system", "tool": "tool",
                "function_response": "tool", "observation": "tool"}
SHAPES = ("messages: [{role, content}]", "conversations: [{from: human|gpt|system, value}]",
          "instruction / input / output (Alpaca)", "prompt / response", "prompt / completion")


# -- records -> messages ------------------------------------------------------------------------------------------

def to_messages(record: dict) -> list[dict[str, str]]:
    """One record of a common dataset shape -> `[{"role", "content"}, ...]` (see SHAPES).

    Args:
        record: a dict of one of the SHAPES (messages, ShareGPT conversations, Alpaca, prompt/response...).

    Returns:
        The chat messages, system first when the record has one.

    Raises:
        InvalidOption: not a dict, or of no known shape (the error lists the shapes).
    """
    if not isinstance(record, dict):
        raise InvalidOption("Converting a record to chat messages", found=f"a {type(record).__name__}, not a dict",
                            fix=f"pass dicts of one of these shapes: {'; '.join(SHAPES)}")
    missing = missing_text(record)
    if missing:
        raise InvalidOption("Converting a record to chat messages", found=f"its {missing!r} is missing (null)",
                            fix="fill it in or drop the record")
    system = record.get("system")
    head = [{"role": "system", "content": str(system)}] if isinstance(system, str) and system.strip() else []
    if isinstance(record.get("messages"), list):
        return _turns(record["messages"], "messages")
    if isinstance(record.get("conversations"), list):
        return _turns(record["conversations"], "conversations")
    if "instruction" in record and "output" in record:
        extra = record.get("input") or ""
        user = str(record["instruction"]) + (f"\n\n{extra}" if str(extra).strip() else "")
        return head + [{"role": "user", "content": user}, {"role": "assistant", "content": str(record["output"])}]
    if "prompt" in record and ("response" in record or "completion" in record):
        answer = record["response"] if "response" in record else record["completion"]
        prompt = _turns(record["prompt"], "prompt") if isinstance(record["prompt"], list) else \
            [{"role": "user", "content": str(record["prompt"])}]
        reply = _turns(answer, "completion") if isinstance(answer, list) else \
            [{"role": "assistant", "content": str(answer)}]
        return (head if prompt[0]["role"] != "system" else []) + prompt + reply
    raise InvalidOption("Converting a record to chat messages", found=f"a record with keys {sorted(record)}",
                        fix=f"give records of one of these shapes: {'; '.join(SHAPES)}; or build the messages "
                            "yourself and pass {'messages': [...]}")


TEXT_FIELDS = ("instruction", "output", "prompt", "response", "completion")


def missing_text(record: dict) -> str | None:
    """The first text field a record has but leaves empty (JSON null, a CSV row cut short), or None when whole:
    str(None) would otherwise be trained on as the literal answer "None"."""
    return next((k for k in TEXT_FIELDS if k in record and _is_missing(record[k])), None)


def _is_missing(value: Any) -> bool:
    """JSON null or a CSV row cut short (None), or pandas' NaN: str() of either would be trained on as text."""
    return value is None or isinstance(value, float) and value != value


def _turns(turns: list, field: str) -> list[dict[str, str]]:
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise InvalidOption(f"Reading {field}[{i}]", found=f"a {type(turn).__name__}, not a dict",
                                fix="each turn is {'role': ..., 'content': ...} or {'from': ..., 'value': ...}")
        speaker = turn.get("role", turn.get("from"))
        text = turn.get("content", turn.get("value"))
        role = ROLE_ALIASES.get(str(speaker).lower()) if speaker is not None else None
        if role is None or text is None:
            raise InvalidOption(f"Reading {field}[{i}]", found=f"speaker {speaker!r}, keys {sorted(turn)}",
                                fix=f"use role/content or from/value with a speaker among {sorted(ROLE_ALIASES)}")
        out.append({"role": role, "content": _text(text)})
    if not out:
        raise InvalidOption(f"Reading {field}", found="an empty conversation", fix="drop empty records")
    return out


def _text(content: Any) -> str:
    """Plain text of a message; multimodal-style content lists keep their text parts."""
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)


# -- files -> records ---------------------------------------------------------------------------------------------

def load_records(path: str | os.PathLike) -> list[dict]:
    """Read a dataset file: JSON Lines (.jsonl), JSON (a list of objects) or CSV (a header row), by extension.

    Args:
        path: the file.

    Returns:
        The records, one dict each.

    Raises:
        InvalidOption: no such regular file, bytes that are not UTF-8 (naming the byte offset), invalid or too deeply
            nested JSON, or records of no known shape.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InvalidOption(f"Reading records from {path}", found="no such file", fix="check the path")
    try:
        return _read_records(path)
    except UnicodeDecodeError:
        offset = first_non_utf8_byte(path)
        raise InvalidOption(f"Reading records from {path}", found=f"its bytes are not UTF-8 text (at byte offset "
                            f"{offset})", fix="convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def first_non_utf8_byte(path: Path, chunk: int = 1 << 20) -> int | None:
    """The file offset of the first byte that is not UTF-8 (the decoder's own offset counts from its chunk)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    done = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                return done - pending + e.start
            done += len(block)
    return None


def _read_records(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        records = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    records.append(_json(line, path, f"line {number}"))
    elif suffix == ".json":
        data = _json(path.read_text(encoding="utf-8"), path, "the file")
        if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}: the one list of records inside
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else data
        records = data
    elif suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            records = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    else:
        raise InvalidOption(f"Reading records from {path}", found=f"an unknown extension {suffix!r}",
                            fix="use .jsonl, .json or .csv, or load the data yourself (datasets.load_dataset)")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise InvalidOption(f"Reading records from {path}", found="not a list of objects",
                            fix="a .json file holds a list of objects ([{...}, {...}]); .jsonl one object per line")
    for number, record in enumerate(records, 1):
        missing = missing_text(record)
        if missing:
            where = f"record {number}" + (f" (line {number + 1})" if suffix in (".csv", ".tsv") else "")
            raise InvalidOption(f"Reading records from {path}", found=f"{where} has no {missing!r} (null, or a row "
                                "cut short)", fix="fill it in or drop the record; it would be trained on as 'None'")
    return records


def _json(text: str, path: Path, where: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: arrays or objects nested too deep
        raise InvalidOption(f"Reading records from {path}", found=f"{where} is not valid JSON ({type(e).__name__}: "
                            f"{e})", fix="fix or remove that line") from e


# -- messages -> tokens -------------------------------------------------------------------------------------------

def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template's text for these messages (no tokenization)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidOption("Applying the chat template", found=f"{type(tokenizer).__name__} has no chat_template",
                            fix="set tokenizer.chat_template (a Jinja template) or use a chat/instruct model")
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as e:  # the template's own raise_exception(...), a syntax error, an undefined name
        roles = [m.get("role") for m in messages if isinstance(m, dict)]
        raise InvalidOption("Applying the chat template", found=f"the chat template refused these messages (roles "
                            f"{roles}): {type(e).__name__}: {e}",
                            fix="give messages the template accepts (some refuse a system turn or need user and "
                                "assistant to alternate), or fix tokenizer.chat_template") from e


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the assistant produced (its content and end-of-turn).

    For assistant turn i the span starts where rendering messages[:i] with the generation prompt stops agreeing with
    the full text (the model starts writing there) and ends where messages[:i+1] ends (its end-of-turn included,
    so the model learns to stop). Templates that render earlier turns differently once later ones follow are
    handled by taking the common prefix. Whitespace the template writes after the turn is left out.
    """
    full = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(os.path.commonprefix([render(tokenizer, messages[:i], add_generation_prompt=True), full])) \
            if i else 0
        end = len(full) if i == len(messages) - 1 else \
            len(os.path.commonprefix([render(tokenizer, messages[:i + 1]), full]))
        while end > start and full[end - 1].isspace():  # the newline after the end-of-turn is not the answer
            end -= 1
        if end > start:
            spans.append((start, end))
    return full, spans


# no token of a real vocabulary is longer than this many characters: text beyond max_seq_length times it cannot
# reach the first max_seq_length tokens, so it is cut before the template renders it
MAX_CHARS_PER_TOKEN = 64


def cut_long_messages(messages: list[dict], max_seq_length: int) -> list[dict]:
    """Messages whose content is cut to what max_seq_length tokens could hold: a 100 MB record with a 64-token
    limit is otherwise rendered and tokenized whole (minutes, gigabytes) to keep 64 tokens."""
    limit = max(max_seq_length, 1) * MAX_CHARS_PER_TOKEN
    return [{**m, "content": m["content"][:limit]} if isinstance(m.get("content"), str) and len(m["content"]) > limit
            else m for m in messages]


def end_tokens(tokenizer) -> list[str]:
    """The texts that end an answer: EOS and the template's special tokens (<|im_end|>, <|eot_id|>, <end_of_turn>)."""
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t and t != tokenizer.pad_token]
    return [t for t in [tokenizer.eos_token, *specials] if t]


def with_eos(tokenizer, full: str, spans: list[tuple[int, int]]) -> tuple[str, list[tuple[int, int]], int]:
    """The rendered text with EOS written after each answer that ends in no end token, the spans moved to match,
    and how many were added: an answer trained without one teaches a model that never stops."""
    eos = tokenizer.eos_token
    ends = end_tokens(tokenizer)
    if not eos or not spans:
        return full, spans, 0
    out, moved, at, shift = [], [], 0, 0
    for start, end in spans:
        missing = not full[start:end].rstrip().endswith(tuple(ends))
        out.append(full[at:end] + (eos if missing else ""))
        moved.append((start + shift, end + shift + (len(eos) if missing else 0)))
        shift += len(eos) if missing else 0
        at = end
    out.append(full[at:])
    return "".join(out), moved, sum(1 for (s, e), (s2, e2) in zip(spans, moved) if e2 - s2 != e - s)


def tokenize_conversation(tokenizer, messages: list[dict], max_seq_length: int | None = None,
                          responses_only: bool = True, eos_added: list | None = None) -> dict[str, list[int]]:
    """Chat-template a conversation into input_ids / attention_mask / labels.

    responses_only=True keeps labels only on the assistant's tokens (everything else -100), so the model learns to
    answer, not to predict the prompts. Sequences are cut to max_seq_length (None: no cut). An answer the
    template ends without an end token gets the tokenizer's EOS (with_eos); `eos_added` collects how many per call.

    Args:
        tokenizer: a tokenizer with a chat template (or one fastload knows for its family).
        messages: `[{"role", "content"}, ...]`.
        max_seq_length: the most tokens kept.
        responses_only: train on the assistant's tokens only.

    Returns:
        {"input_ids", "attention_mask", "labels"} as lists of ints.
    """
    if max_seq_length is not None:
        messages = cut_long_messages(messages, max_seq_length)
    full, spans = assistant_spans(tokenizer, messages)
    full, spans, added = with_eos(tokenizer, full, spans)
    if eos_added is not None:
        eos_added.append(added)
    # the template already wrote BOS and friends: adding special tokens again would double them
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
    ids = list(enc["input_ids"])
    if not responses_only:
        labels = list(ids)
    elif tokenizer.is_fast:
        starts = [a for a, _ in enc["offset_mapping"]]
        labels = [t if any(s <= c < e for s, e in spans) else IGNORE_INDEX for t, c in zip(ids, starts)]
    else:  # slow tokenizers have no offsets: a boundary is the token count of the text before it
        labels = [IGNORE_INDEX] * len(ids)
        for s, e in spans:
            a = len(tokenizer(full[:s], add_special_tokens=False)["input_ids"])
            b = len(tokenizer(full[:e], add_special_tokens=False)["input_ids"])
            labels[a:b] = ids[a:b]
    if max_seq_length is not None:
        ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def prepare_records(records: Iterable[dict], tokenizer, max_seq_length: int | None = None,
                    responses_only: bool = True) -> list[dict[str, list[int]]]:
    """to_messages + tokenize_conversation over records; examples with no trainable token left are dropped. One
    warning counts the answers that had no end token (EOS was added to them).

    Args:
        records: dicts of the SHAPES (e.g. from load_records).
        tokenizer: the model's tokenizer.
        max_seq_length: the most tokens per example.
        responses_only: train on the assistant's tokens only.

    Returns:
        The tokenized examples, ready for Collator or pack.

    Raises:
        InvalidOption: a record of no known shape, or no example kept a trainable token.
    """
    out, eos_added = [], []
    for record in records:
        example = tokenize_conversation(tokenizer, to_messages(record), max_seq_length, responses_only, eos_added)
        if any(label != IGNORE_INDEX for label in example["labels"]):
            out.append(example)
    if sum(eos_added):
        from fastload._log import logger

        logger.warning("EOS added at the end of %d answers in %d of %d records: the chat template ends them without "
                       "an end token (%r), so the model would not learn to stop", sum(eos_added),
                       sum(1 for n in eos_added if n), len(eos_added), tokenizer.eos_token)
    if not out:
        raise InvalidOption("Preparing the training examples", found="no example kept a trainable token",
                            fix="check that records have assistant answers, or raise max_seq_length")
    return out


# -- packing ------------------------------------------------------------------------------------------------------

def pack(examples: Sequence[dict], max_seq_length: int) -> list[dict[str, list[int]]]:
    """Pack tokenized examples into rows of at most max_seq_length tokens (best-fit decreasing).

    Each row carries position_ids restarting at 0 for every sequence and no attention_mask: transformers then
    derives a block-diagonal causal mask from the position_ids (sdpa, eager and flex; flash attention uses them as
    sequence boundaries), so packed sequences never attend to each other. The first label of every sequence is
    -100: it would otherwise be predicted from the previous sequence's last token.

    Args:
        examples: tokenized examples (input_ids, and labels: default the input_ids).
        max_seq_length: the row length; a longer example is cut to it.

    Returns:
        Rows of {"input_ids", "labels", "position_ids"}.

    Raises:
        InvalidOption: max_seq_length is not a positive integer.
    """
    if not isinstance(max_seq_length, int) or max_seq_length <= 0:
        raise InvalidOption(f"pack(max_seq_length={max_seq_length!r})", found="not a positive integer",
                            fix="pass the model's max_seq_length, e.g. model.max_seq_length")
    items = []
    for ex in examples:
        ids = list(ex["input_ids"])[:max_seq_length]
        labels = list(ex.get("labels", ex["input_ids"]))[:max_seq_length]
        if ids:
            items.append((ids, labels))
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    rows: list[list[int]] = []      # indices of the items in each row
    free: list[tuple[int, int]] = []  # (space left, row index), sorted: the tightest row that fits is found by bisect
    for i in order:
        n = len(items[i][0])
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, row = free.pop(at)
        else:
            space, row = max_seq_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, row))
    packed = []
    for row in rows:
        ids, labels, positions = [], [], []
        for i in sorted(row):  # dataset order inside a row
            seq_ids, seq_labels = items[i]
            ids += seq_ids
            labels += [IGNORE_INDEX] + seq_labels[1:]
            positions += list(range(len(seq_ids)))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return packed


# -- batches ------------------------------------------------------------------------------------------------------

class Collator:
    """Pad a list of examples on the right into tensors: pad id for input_ids, -100 for labels, 0 for the mask.

    Packed examples (with position_ids) get position_ids and no attention_mask, which is what keeps their
    sequences apart (see pack). Examples without labels train on every token.

    Args:
        tokenizer: gives the pad id (its pad token, else its eos token).
        pad_token_id: the pad id, overriding the tokenizer's.
        pad_to_multiple_of: pad each batch to a multiple of this length (tensor cores like multiples of 8).

    Raises:
        InvalidOption: no pad id is known.
    """

    def __init__(self, tokenizer=None, pad_token_id: int | None = None, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
            if pad_token_id is None:
                pad_token_id = getattr(tokenizer, "eos_token_id", None)
        if pad_token_id is None:
            raise InvalidOption("Building the data collator", found="no pad token id (tokenizer has no pad or eos)",
                                fix="pass pad_token_id=..., or set tokenizer.pad_token")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        import torch

        length = max(len(ex["input_ids"]) for ex in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = all("position_ids" in ex for ex in examples)

        def padded(key: str, fill: int, default=None):
            rows = []
            for ex in examples:
                values = list(ex[key]) if key in ex else list(default(ex))
                rows.append(values + [fill] * (length - len(values)))
            return torch.tensor(rows, dtype=torch.long)

        batch = {"input_ids": padded("input_ids", self.pad_token_id),
                 "labels": padded("labels", IGNORE_INDEX, lambda ex: ex["input_ids"])}
        if packed:
            # padding at the end: each pad position restarts at 0, a sequence of its own that no real token sees
            batch["position_ids"] = padded("position_ids", 0)
            # transformers builds the block-diagonal mask from position_ids only without a KV cache (checked with
            # sdpa and eager): a model whose config says use_cache=True would silently let sequences see each other
            batch["use_cache"] = False
        else:
            batch["attention_mask"] = padded("attention_mask", 0, lambda ex: [1] * len(ex["input_ids"]))
        return batch


# -- preview ------------------------------------------------------------------------------------------------------

DIM, RESET = "\033[2m", "\033[0m"


def preview(tokenizer, record_or_dataset, index: int = 0, max_seq_length: int | None = None,
            responses_only: bool = True, color: bool | None = None, file=None) -> dict[str, list[int]]:
    """Print one example as the trainer sees it: the rendered text with the tokens that are not trained shown dim
    (or [[in double brackets]] where the output is no terminal), the trained ones plain; and return the example.

    Args:
        tokenizer: the model's tokenizer (its chat template renders the record).
        record_or_dataset: one record of a common shape, a tokenized example (input_ids, labels), a list or
            datasets.Dataset of either, or a path load_records reads.
        index: which example of a dataset.
        max_seq_length: the cut the trainer applies (None: none).
        responses_only: as in get_trainer: labels only on the answers.
        color: dim with ANSI codes (None: when the output is a terminal).
        file: where to print (None: stdout).

    Returns:
        The example: input_ids, attention_mask, labels.

    Raises:
        InvalidOption: an index outside the dataset, or a record of no known shape.
    """
    import sys

    item = _pick(record_or_dataset, index)
    example = dict(item) if "input_ids" in item else \
        tokenize_conversation(tokenizer, to_messages(item), max_seq_length, responses_only)
    out = file or sys.stdout
    if color is None:
        color = callable(getattr(out, "isatty", None)) and out.isatty()
    print(preview_text(tokenizer, example, color), file=out)
    return example


def preview_text(tokenizer, example: dict, color: bool = False) -> str:
    """The example's text, runs of untrained tokens dimmed (color) or in [[double brackets]]."""
    ids, labels = list(example["input_ids"]), list(example.get("labels", example["input_ids"]))
    parts, run, trained_run = [], [], None
    for token, label in zip(ids, labels):
        trained = label != IGNORE_INDEX
        if run and trained != trained_run:
            parts.append(_shown(tokenizer.decode(run), trained_run, color))
            run = []
        run.append(token)
        trained_run = trained
    if run:
        parts.append(_shown(tokenizer.decode(run), trained_run, color))
    return "".join(parts)


def _shown(text: str, trained: bool, color: bool) -> str:
    if trained:
        return text
    return f"{DIM}{text}{RESET}" if color else f"[[{text}]]"


def _pick(data, index: int) -> dict:
    if isinstance(data, (str, os.PathLike)):
        data = load_records(data)
    if isinstance(data, dict):
        return data
    try:
        item = data[index]
    except (IndexError, KeyError, TypeError) as e:
        size = len(data) if hasattr(data, "__len__") else "?"
        raise InvalidOption(f"preview(..., index={index})", found=f"no such example (the data holds {size})",
                            fix="pass an index inside the data") from e
    return item
