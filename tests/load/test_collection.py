"""The cyclic garbage collector is paused while from_pretrained builds the model (fastload.load.collection) and runs
again, as the user had it, once the load returns or fails."""

from __future__ import annotations

import gc

import pytest

from fastload import FastModel
from fastload.errors import FastloadError


def test_the_collector_is_off_during_the_lora_step_and_back_on_after(tiny_llama, monkeypatch):
    from fastload.train import lora

    during = []
    apply = lora.apply_lora
    monkeypatch.setattr(lora, "apply_lora", lambda *a, **k: during.append(gc.isenabled()) or apply(*a, **k))
    assert gc.isenabled()
    FastModel.from_pretrained(tiny_llama)
    assert during == [False] and gc.isenabled()


def test_a_failed_load_turns_the_collector_back_on_and_a_users_off_switch_stays(tmp_path):
    with pytest.raises(FastloadError):
        FastModel.from_pretrained(str(tmp_path / "nothing-here"))
    assert gc.isenabled()
    gc.disable()
    try:
        with pytest.raises(FastloadError):
            FastModel.from_pretrained(str(tmp_path / "nothing-here"))
        assert not gc.isenabled()
    finally:
        gc.enable()
