"""Data checks a user needs before training: EOS ends every answer (added, with one warning, where the chat
template omits it), and a preview of one rendered example showing which tokens are trained."""

from __future__ import annotations

import io
import logging

import pytest
from transformers import AutoTokenizer

from fastload.data import IGNORE_INDEX, prepare_records, preview, preview_text

RECORD = {"prompt": "What is 2+2?", "response": "4"}
NO_EOS_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.fixture
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def trained_text(tok, example) -> str:
    return tok.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])


def test_template_with_eos_is_left_alone(tok, caplog):
    with caplog.at_level(logging.WARNING, logger="fastload"):
        (example,) = prepare_records([RECORD], tok)
    assert trained_text(tok, example) == "4<|im_end|>"  # ChatML ends the turn with EOS already
    assert "EOS added" not in caplog.text


def test_eos_is_added_where_the_template_omits_it_with_one_warning(tok, caplog):
    tok.chat_template = NO_EOS_TEMPLATE
    with caplog.at_level(logging.WARNING, logger="fastload"):
        examples = prepare_records([RECORD, RECORD, {"prompt": "Hi", "response": "5<|im_end|>"}], tok)
    assert [trained_text(tok, e) for e in examples] == ["4<|im_end|>", "4<|im_end|>", "5<|im_end|>"]
    assert all(e["input_ids"][e["labels"].index(tok.eos_token_id)] == tok.eos_token_id for e in examples)
    warnings = [r for r in caplog.records if "EOS added" in r.getMessage()]
    assert len(warnings) == 1 and "2 answers in 2 of 3 records" in warnings[0].getMessage()


def test_preview_prints_masked_parts_apart_and_returns_the_example(tok):
    shown = io.StringIO()
    example = preview(tok, [{"prompt": "x", "response": "y"}, RECORD], index=1, file=shown)
    text = shown.getvalue()
    assert text.startswith("[[<|im_start|>system") and "What is 2+2?<|im_end|>" in text
    assert "]]4<|im_end|>[[" in text  # the answer and its end token are trained, the rest is not
    assert example == prepare_records([RECORD], tok)[0]
    assert preview_text(tok, example, color=True).count("\033[2m") == 2  # dimmed on a terminal
    with pytest.raises(Exception, match="no such example"):
        preview(tok, [RECORD], index=5, file=io.StringIO())
