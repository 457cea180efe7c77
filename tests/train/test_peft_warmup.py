"""peft's table of transformers' checkpoint renamings is built beside the weight read, once, not inside the LoRA
step of the load (fastload.train.peft_warmup)."""

from __future__ import annotations

import threading

from fastload import FastModel


def test_the_renaming_table_peft_needs_is_built_once_on_the_warmup_thread(tiny_llama, monkeypatch):
    from transformers import conversion_mapping

    builds = []
    build = conversion_mapping._build_checkpoint_conversion_mapping
    monkeypatch.setattr(conversion_mapping, "_checkpoint_conversion_mapping_cache", None)
    monkeypatch.setattr(conversion_mapping, "_build_checkpoint_conversion_mapping",
                        lambda: builds.append(threading.current_thread().name) or build())
    model, _ = FastModel.from_pretrained(tiny_llama)
    assert builds == ["fastload-peft-warmup"]
    assert any("lora_A" in name for name, _ in model.named_parameters())
