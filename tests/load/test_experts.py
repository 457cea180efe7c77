"""MoE experts at load: stored 4-bit by default with the model's own quant type and double quant, the store entry
keeping the checkpoint's 16-bit experts (so a load from the store quantizes exactly the same bytes, and an opt-out
load from it gets the original values back), the opt-out and 8-bit loads saying they stay 16-bit."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from fastload import FastModel
from fastload.load.nf4_experts import is_stack
from fastload.sources.store import Store

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))

from family_shapes import make_family_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory) -> Path:
    return make_family_checkpoint(tmp_path_factory.mktemp("qwen3_moe") / "model", "qwen3_moe")


def load(path, store=False, **options):
    options = {"lora": None, "engine": False, "gradient_checkpointing": False, **options}
    model, _ = FastModel.from_pretrained(str(path), store=store, **options)
    return model


def experts(model) -> dict:
    return {n: p for n, p in model.named_parameters() if ".experts." in n and p.ndim == 3}


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_experts_follow_the_models_4bit_settings(moe_checkpoint, quant_type, double_quant):
    model = load(moe_checkpoint, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant)
    stacks = experts(model)
    assert stacks and all(is_stack(p) for p in stacks.values())
    for p in stacks.values():
        assert p.form.quant_type == quant_type and (p.form.nested_blocksize is not None) == double_quant
        assert p.form.blocksize == 64 and not p.requires_grad


def test_the_store_keeps_16bit_experts_and_every_load_quantizes_the_same(moe_checkpoint, tmp_path):
    """The entry is written before the experts are quantized: an opt-out load from it gets the checkpoint's own
    values (not NF4-rounded ones), and a default load from it the same 4-bit bytes as the first load."""
    original = experts(load(moe_checkpoint, quantize_experts=False))
    store = Store(tmp_path / "home")
    first = load(moe_checkpoint, store)
    dense = load(moe_checkpoint, store, quantize_experts=False)
    assert dense.fastload.plan.source == "store"
    assert experts(dense).keys() == original.keys()
    for name, p in experts(dense).items():
        assert not is_stack(p) and torch.equal(p, original[name]), name

    again = load(moe_checkpoint, store)
    assert again.fastload.plan.source == "store"
    mine, theirs = experts(first), experts(again)
    assert mine and mine.keys() == theirs.keys() and all(is_stack(p) for p in theirs.values())
    for name, p in mine.items():
        assert torch.equal(p.packed, theirs[name].packed), name
        assert torch.equal(p.dequantize(), theirs[name].dequantize()), name
        assert not torch.equal(p.dequantize(), original[name])  # really 4-bit: NF4 rounding is visible


def test_opting_out_and_8bit_keep_experts_16bit_and_say_so(moe_checkpoint, caplog):
    with caplog.at_level(logging.WARNING, logger="fastload"):
        dense = load(moe_checkpoint, quantize_experts=False)
    assert experts(dense) and not any(is_stack(p) for p in experts(dense).values())
    assert any("stay in" in r.message and "quantize_experts=False" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastload"):
        eight = load(moe_checkpoint, load_in_8bit=True)
    assert not any(is_stack(p) for p in experts(eight).values())
    assert any("stay in" in r.message and "8-bit" in r.message for r in caplog.records)


def test_quantize_experts_must_be_a_bool(moe_checkpoint):
    from fastload.errors import InvalidOption

    with pytest.raises(InvalidOption, match="quantize_experts"):
        load(moe_checkpoint, quantize_experts="no")


def test_quantize_out_writes_the_checkpoints_experts_and_loads_them_4bit(moe_checkpoint, tmp_path, capsys):
    """`fastload quantize --out` writes a bitsandbytes checkpoint, which holds no 4-bit experts: the checkpoint's own
    expert values go in (not NF4-rounded ones), and loading it stores them 4-bit as any load does."""
    from fastload.cli import main

    out = tmp_path / "q4"
    assert main(["quantize", str(moe_checkpoint), "--out", str(out)]) == 0
    original = experts(load(moe_checkpoint, quantize_experts=False))
    written = experts(load(out, quantize_experts=False))
    assert written.keys() == original.keys()
    assert all(torch.equal(written[k], original[k]) for k in original)
    four = experts(load(out))
    assert all(is_stack(p) for p in four.values())
    assert all(torch.equal(four[k].packed, p.packed) for k, p in experts(load(moe_checkpoint)).items())


def test_saving_a_model_with_4bit_experts_writes_their_dequantized_values(moe_checkpoint, tmp_path):
    """save_quantized (transformers' save_pretrained) on a model whose experts are 4-bit stacks: written as their
    dequantized values, and the model keeps its stacks after."""
    from fastload.save.quantized import save_quantized

    model, tokenizer = FastModel.from_pretrained(str(moe_checkpoint), store=False, lora=None, engine=False)
    stacks = experts(model)
    save_quantized(model, tokenizer, tmp_path / "out")
    assert all(p is stacks[k] for k, p in experts(model).items())  # the same stacks after the save
    written = experts(load(tmp_path / "out", quantize_experts=False))
    assert written.keys() == stacks.keys()
    assert all(torch.equal(written[k], p.dequantize()) for k, p in stacks.items())


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_experts_are_quantized_as_transformers_reads_them(family, tmp_path):
    """Around transformers' own from_pretrained, each fused expert weight becomes a stack as it is registered (so
    the load never holds all of them 16-bit), with the bytes quantizing the loaded weight gives, not re-initialized
    afterwards; nothing else changes."""
    from transformers import AutoModelForCausalLM

    from fastload.load.experts import quantized_on_arrival
    from fastload.load.nf4_experts import quantize_stack

    path = make_family_checkpoint(tmp_path / family, family)
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with quantized_on_arrival(("nf4", True)):
        four = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    stacks, weights = experts(four), experts(dense)
    assert stacks.keys() == weights.keys() and stacks and all(is_stack(p) for p in stacks.values())
    for name, p in stacks.items():
        assert torch.equal(p.packed, quantize_stack(weights[name]).packed), name
    others = {n: p for n, p in four.named_parameters() if n not in stacks}
    assert all(torch.equal(p, dict(dense.named_parameters())[n]) for n, p in others.items())
    after = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # the hook is gone
    assert not any(is_stack(p) for p in after.parameters())


def test_the_direct_load_quantizes_experts_as_it_reads_them(tmp_path, monkeypatch):
    """fastload's own reader (the direct 4-bit load) stores each expert weight 4-bit as it is placed, as around
    transformers' from_pretrained: when the load hands the model on, every expert is a stack already (a GPU load
    that quantized them afterwards held all of them 16-bit at once: the GPU peak test's regression)."""
    from fastload import FastModel
    from fastload.bench.models import create_checkpoint
    from fastload.load import experts as experts_module
    from fastload.model_state import state_of

    path = tmp_path / "tiny-moe"  # the benchmark's writer: fused expert names, which the direct load reads as they are
    create_checkpoint("tiny-moe", path)
    monkeypatch.setenv("FASTLOAD_DIRECT_LOAD", "1")
    seen = []
    settle = experts_module.settle_experts
    monkeypatch.setattr(experts_module, "settle_experts",
                        lambda model, *a: seen.append({n: is_stack(p) for n, p in experts(model).items()})
                        or settle(model, *a))
    model, _ = FastModel.from_pretrained(str(path), store=False, lora=None)
    assert state_of(model).direct_load
    assert len(seen) == 1 and seen[0] and all(seen[0].values()), seen
