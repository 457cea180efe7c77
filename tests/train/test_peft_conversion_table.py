"""transformers' table of checkpoint renamings (about a thousand regular expressions for every architecture it
knows) is built on its first use in a process. peft asks for it at every LoRA injection only to rename the targets
of adapters written for transformers 4; a LoRA that fastload builds from the model's own module names never needs
it, so a fastload load must not pay for it (0.3-0.6 s measured on a CI core inside the load's LoRA step), while an
adapter from transformers 4 still gets it (tests/train/test_moe_lora_targets.py)."""

from __future__ import annotations

from fastload import FastModel


def _count_builds(monkeypatch) -> list[int]:
    from transformers import conversion_mapping

    builds = []
    build = conversion_mapping._build_checkpoint_conversion_mapping
    monkeypatch.setattr(conversion_mapping, "_checkpoint_conversion_mapping_cache", None)
    monkeypatch.setattr(conversion_mapping, "_build_checkpoint_conversion_mapping",
                        lambda: builds.append(1) or build())
    return builds


def test_a_load_with_lora_never_builds_the_renaming_table(tiny_llama, monkeypatch):
    """On the fly, from the store, and adapters added later: none of them builds it. (Writing the store entry does:
    transformers' save_pretrained reverts its renamings, so the entry is written before counting.)"""
    FastModel.from_pretrained(tiny_llama, lora=None)  # writes the store entry
    builds = _count_builds(monkeypatch)
    for store in (False, True):
        model, _ = FastModel.from_pretrained(tiny_llama, store=store)
        assert any("lora_A" in name for name, _ in model.named_parameters())
        assert model.fastload.plan.source == ("store" if store else "local")
    assert builds == []
    later, _ = FastModel.from_pretrained(tiny_llama, lora=None, store=False)
    later = FastModel.get_peft_model(later, r=4, target_modules=["q_proj", "v_proj"])
    assert {n.split(".")[-4] for n, _ in later.named_parameters() if "lora_A" in n} == {"q_proj", "v_proj"}
    assert builds == []


def test_plain_peft_still_gets_the_table_after_fastload_wrapped_it(tiny_llama, monkeypatch):
    """The skip holds only inside fastload's own injection: a user's get_peft_model in the same process asks
    transformers as before."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    FastModel.from_pretrained(tiny_llama)  # wraps peft's calls
    builds = _count_builds(monkeypatch)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    assert builds == [1]
