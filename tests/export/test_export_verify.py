"""What a merge cost (fastload.export.verify, run by save_merged by default): the LoRA model and its merged result
on one probe batch. A merge into the dequantized 4-bit weights reproduces the trained model up to bf16 rounding; a
merge into the 16-bit source differs from it by the NF4 quantization error, which is many times larger: the report
must show that difference, and be silent when verify=False."""

from __future__ import annotations

import logging
import math

import torch

from fastload import FastModel
from fastload.export.verify import probe_texts, report_merge
from tiny import nonzero_lora_b


def test_merge_report_shows_the_cost_of_each_source(tiny_llama, tmp_path):
    model, tok = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.float32)
    nonzero_lora_b(model)
    reports = {}
    for source in ("16bit", "dequantized"):
        merged = FastModel.save_merged(model, tmp_path / source, tok, source=source, dtype=torch.float32, verify=False)
        reports[source] = report_merge(model, merged, tok)
    for r in reports.values():
        assert r.n_tokens > 10 and math.isfinite(r.loss_before) and math.isfinite(r.loss_after)
        assert r.loss_before == reports["16bit"].loss_before  # the same LoRA model, the same probe
    # float32 merge of the dequantized weights: round-off only; the 16-bit source lacks the NF4 error it trained on
    assert reports["dequantized"].max_logit_diff < 1e-3
    assert reports["16bit"].max_logit_diff > 10 * reports["dequantized"].max_logit_diff


def test_save_merged_reports_by_default_and_not_with_verify_false(tiny_llama, tmp_path, caplog):
    model, tok = FastModel.from_pretrained(tiny_llama, store=False, dtype=torch.float32)
    nonzero_lora_b(model)
    with caplog.at_level(logging.INFO, logger="fastload"):
        FastModel.save_merged(model, tmp_path / "a", tok, probe_texts=["the quick brown fox jumps over the lazy dog"])
    line = next(r.getMessage() for r in caplog.records if "merge check" in r.getMessage())
    assert "loss" in line and "perplexity" in line and "max logit difference" in line
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastload"):
        FastModel.save_merged(model, tmp_path / "b", tok, verify=False)
    assert "merge check" not in caplog.text


def test_probe_uses_held_out_texts_else_the_chat_template(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert probe_texts(tok, ["held out"]) == ["held out"]
    assert probe_texts(tok)[0].startswith("<|im_start|>user\n")
