"""The tokenizer inside the GGUF: tokens, their types, merges or scores, special ids and the chat template, read
from the fast tokenizer's tokenizer.json the way llama.cpp's tokenizer expects them."""

from __future__ import annotations

import json
from pathlib import Path

from fastload._log import logger
from fastload.errors import UnsupportedArchitecture

# llama.cpp picks its pre-tokenizer regex by name; these are recognised from tokenizer.json's own regex
SPLIT_PATTERNS = (("\\p{N}{1,3}", "llama-bpe"), ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|",
                                                 "qwen2"))


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """The name llama.cpp knows this tokenizer's pre-tokenization by; "gpt-2" (GPT-2's regex) when unrecognised."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [s.get("type") for s in steps]
    if types == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if types == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    for step in steps:
        regex = (step.get("pattern") or {}).get("Regex", "") if step.get("type") == "Split" else ""
        for fragment, name in SPLIT_PATTERNS:
            if fragment in regex:
                return name
    logger.warning("GGUF: this tokenizer's pre-tokenization (%s) has no llama.cpp name; writing 'gpt-2', so "
                   "llama.cpp may split some texts differently from transformers", "+".join(map(str, types)))
    return "gpt-2"


def add_tokenizer(writer, tokenizer_dir: Path, vocab_size: int) -> None:
    """Write the tokenizer of tokenizer_dir (which must hold tokenizer.json) for an embedding of vocab_size rows."""
    import gguf

    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise UnsupportedArchitecture("Embedding the tokenizer in the GGUF", found=f"no tokenizer.json in "
                                      f"{tokenizer_dir}", fix="pass the fast tokenizer (tokenizer=...) it was "
                                      "trained with")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedArchitecture("Embedding the tokenizer in the GGUF", found=f"a {model.get('type')} "
                                      "tokenizer; fastload writes BPE tokenizers",
                                      fix="convert the merged folder with llama.cpp's convert_hf_to_gguf.py")
    if model.get("byte_fallback"):
        _add_sentencepiece_style(writer, data, vocab_size)
    else:
        _add_byte_level(writer, data, vocab_size)
    # merges (byte-level BPE only), bos/eos/unk/pad ids, add_bos/add_eos and the chat template
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=not model.get("byte_fallback"), n_vocab=vocab_size)
    # llama.cpp adds a bos token unless told otherwise; say what the tokenizer itself does
    special.add_special_token.setdefault("bos", _adds_leading_special(data))
    special.add_to_gguf(writer, quiet=True)


def _adds_leading_special(tokenizer_json: dict) -> bool:
    """Whether tokenizer.json's post-processor puts a special token (bos) before the text."""
    pp = tokenizer_json.get("post_processor") or {}
    steps = pp.get("processors", []) if pp.get("type") == "Sequence" else [pp]
    for step in steps:
        single = (step.get("single") or []) if step.get("type") == "TemplateProcessing" else []
        if single and "SpecialToken" in single[0]:
            return True
    return False


def _add_byte_level(writer, data: dict, vocab_size: int) -> None:
    import gguf

    by_id: dict[int, str] = {i: t for t, i in data["model"]["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in by_id}
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    _check_fits(max(by_id) + 1, vocab_size)
    tokens, token_types = [], []
    for i in range(vocab_size):  # rows past the tokenizer's last id (padded embeddings) get placeholder tokens
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        token_types.append(types.get(i, gguf.TokenType.UNUSED))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(data))
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)


def _add_sentencepiece_style(writer, data: dict, vocab_size: int) -> None:
    """Llama-2 / Mistral / Gemma tokenizers (BPE with byte fallback) as llama.cpp's SentencePiece vocab. Its merges
    follow the pieces' scores; SentencePiece numbers pieces in merge order, so a piece's score is minus its id."""
    import gguf

    by_id: dict[int, str] = {i: t for t, i in data["model"]["vocab"].items()}
    types = {i: _piece_type(t) for i, t in by_id.items()}
    scores = {i: -float(i) if types[i] == gguf.TokenType.NORMAL else 0.0 for i in by_id}
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        scores[added["id"]] = 0.0
    unk = data["model"].get("unk_token")
    for i, t in by_id.items():
        if t == unk:
            types[i] = gguf.TokenType.UNKNOWN
    _check_fits(max(by_id) + 1, vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)])
    writer.add_token_scores([scores.get(i, -1e9) for i in range(vocab_size)])
    writer.add_token_types([types.get(i, gguf.TokenType.UNUSED) for i in range(vocab_size)])


def _piece_type(text: str):
    import gguf

    is_byte = len(text) == 6 and text.startswith("<0x") and text.endswith(">")
    return gguf.TokenType.BYTE if is_byte else gguf.TokenType.NORMAL


def _check_fits(n_tokens: int, vocab_size: int) -> None:
    if n_tokens > vocab_size:
        raise UnsupportedArchitecture("Embedding the tokenizer in the GGUF", found=f"{n_tokens} tokens for an "
                                      f"embedding of {vocab_size} rows",
                                      fix="pass the tokenizer the model was trained with (resize the embedding "
                                          "after adding tokens)")
