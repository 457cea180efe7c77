"""transformers' loader reads in turn while fastload has it quantize (fastload.load.reads_in_turn): its thread pool
read the whole 16-bit checkpoint onto the GPU before quantizing (transformers 5.17)."""

from __future__ import annotations

import os

import pytest

from fastload import FastModel
from fastload.load import task
from fastload.load.reads_in_turn import SWITCH, reads_in_turn


def spy_switch(monkeypatch) -> list:
    """What HF_DEACTIVATE_ASYNC_LOAD was while transformers' from_pretrained ran."""
    seen = []
    model_class = task.model_class

    class Spy:
        def __init__(self, task):
            self.cls = model_class(task)

        def from_pretrained(self, *args, **kwargs):
            seen.append(os.environ.get(SWITCH))
            return self.cls.from_pretrained(*args, **kwargs)

    monkeypatch.setattr(task, "model_class", Spy)
    monkeypatch.setenv("FASTLOAD_DIRECT_LOAD", "0")  # transformers' path
    return seen


def test_an_on_the_fly_load_through_transformers_reads_in_turn_and_restores_the_environment(tiny_llama,
                                                                                           monkeypatch):
    monkeypatch.delenv(SWITCH, raising=False)
    seen = spy_switch(monkeypatch)
    FastModel.from_pretrained(tiny_llama, store=False, lora=None)
    assert seen == ["1"] and SWITCH not in os.environ
    FastModel.from_pretrained(tiny_llama, store=False, lora=None, load_in_4bit=False)  # 16-bit: nothing to quantize
    assert seen == ["1", None]


def test_a_users_own_setting_stands():
    os.environ[SWITCH] = "0"
    try:
        with reads_in_turn(True):
            assert os.environ[SWITCH] == "0"
        assert os.environ[SWITCH] == "0"
    finally:
        del os.environ[SWITCH]


def test_overlapping_loads_keep_it_on_until_the_last_one_ends():
    with reads_in_turn(True):
        with reads_in_turn(True):
            assert os.environ[SWITCH] == "1"
        assert os.environ[SWITCH] == "1"
    assert SWITCH not in os.environ
    with pytest.raises(RuntimeError), reads_in_turn(True):
        raise RuntimeError("a failed load")
    assert SWITCH not in os.environ
