"""A store entry quantized under other layer rules (fastload/layer_rules.toml) than this fastload's is rebuilt: a
layer fastload now keeps 16-bit must not keep coming back 4-bit from an entry written before the rule existed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.nn as nn

from fastload import FastModel
from fastload.sources.store import MANIFEST, Store

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))

from family_shapes import make_family_checkpoint  # noqa: E402


def _forget_kept_layers(entry) -> None:
    """The manifest as fastload wrote it before it recorded the layers it kept 16-bit."""
    manifest = json.loads((entry.path / MANIFEST).read_text())
    del manifest["kept_16bit"]
    (entry.path / MANIFEST).write_text(json.dumps(manifest))


def test_an_entry_written_before_a_rule_is_rebuilt_with_the_layer_16bit(tmp_path, isolated_env, caplog):
    mamba = make_family_checkpoint(tmp_path / "mamba", "mamba")
    FastModel.from_pretrained(str(mamba), lora=None)
    [entry] = Store(isolated_env).entries()
    assert entry.manifest["kept_16bit"] == ["dt_proj"]
    _forget_kept_layers(entry)

    with caplog.at_level("WARNING", logger="fastload"):
        model, _ = FastModel.from_pretrained(str(mamba), lora=None)
    assert "will be rebuilt" in caplog.text and "dt_proj" in caplog.text
    assert model.fastload.quantized_now  # quantized again, not served from the old entry
    assert type(model.get_submodule("backbone.layers.0.mixer.dt_proj")) is nn.Linear
    [rebuilt] = Store(isolated_env).entries()
    assert rebuilt.manifest["kept_16bit"] == ["dt_proj"]

    caplog.clear()
    with caplog.at_level("WARNING", logger="fastload"):
        again, _ = FastModel.from_pretrained(str(mamba), lora=None)
    assert not again.fastload.quantized_now and "rebuilt" not in caplog.text


def test_an_older_entry_of_a_family_without_rules_is_still_served(tiny_llama, isolated_env, caplog):
    FastModel.from_pretrained(tiny_llama, lora=None)
    [entry] = Store(isolated_env).entries()
    assert entry.manifest["kept_16bit"] == []
    _forget_kept_layers(entry)
    with caplog.at_level("WARNING", logger="fastload"):
        model, _ = FastModel.from_pretrained(tiny_llama, lora=None)
    assert not model.fastload.quantized_now and "rebuilt" not in caplog.text
