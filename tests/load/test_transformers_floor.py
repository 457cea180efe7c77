"""A model type an older transformers cannot run in 16-bit stops before any weight is read, naming the release."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fastload.errors import UnsupportedArchitecture
from fastload.load.transformers_floor import check_transformers_floor

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))


@pytest.mark.parametrize("installed", ["5.17.0", "5.19.0", "5.19.0.dev0"])
def test_deepseek_v4_in_bf16_on_a_transformers_that_fails_it_names_the_release(installed):
    with pytest.raises(UnsupportedArchitecture) as raised:
        check_transformers_floor("deepseek_v4", torch.bfloat16, "org/DeepSeek-V4", installed=installed)
    message = str(raised.value)
    assert f"transformers {installed}" in message and "transformers>=5.20.0" in message
    assert "org/DeepSeek-V4" in message and "o_a_proj" in message


@pytest.mark.parametrize("model_type, dtype, installed", [
    ("deepseek_v4", torch.bfloat16, "5.20.0"), ("deepseek_v4", torch.bfloat16, "5.25.0"),
    ("deepseek_v4", torch.float32, "5.17.0"), ("llama", torch.bfloat16, "5.0.0")])
def test_what_runs_is_not_refused(model_type, dtype, installed):
    check_transformers_floor(model_type, dtype, "m", installed=installed)


def test_a_load_on_such_a_transformers_stops_before_reading_weights(tmp_path, monkeypatch):
    """The real load path: transformers' version reported as 5.17, the tiny DeepSeek-V4 refused, nothing stored."""
    from family_shapes import make_family_checkpoint

    from fastload import FastModel

    path = make_family_checkpoint(tmp_path / "deepseek_v4", "deepseek_v4")
    monkeypatch.setattr("fastload.load.transformers_floor.installed_transformers", lambda: "5.17.0")
    home = tmp_path / "home"
    monkeypatch.setenv("FASTLOAD_HOME", str(home))
    with pytest.raises(UnsupportedArchitecture, match="transformers>=5.20.0"):
        FastModel.from_pretrained(str(path), dtype="bfloat16")
    assert not list(home.glob("quantized/*"))
