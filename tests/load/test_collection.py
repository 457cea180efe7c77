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


def test_a_direct_load_that_gives_up_is_freed_before_transformers_reads_again(tiny_llama, monkeypatch, caplog):
    """The direct load's 4-bit weights point back at their layers (reference cycles) and the collector is paused
    during a load: when it gives up after reading, its model must be gone before transformers reads the checkpoint
    a second time (else a GPU holds both copies), also while a handler keeps the log records (as here)."""
    import logging
    import weakref

    caplog.set_level(logging.INFO, logger="fastload")

    from fastload.load import fast_4bit, task

    given_up, alive_at_reread = [], []

    def finish(model, *args, **kwargs):  # a 4-bit layer of the model: it and its weight form the cycle
        import bitsandbytes as bnb

        given_up.append(weakref.ref(next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))))
        raise fast_4bit.NotCovered("a test's refusal")

    model_class = task.model_class

    class Spy:
        def __init__(self, kind):
            self.cls = model_class(kind)

        def from_pretrained(self, *args, **kwargs):
            alive_at_reread.append(given_up[0]() is not None)
            return self.cls.from_pretrained(*args, **kwargs)

    monkeypatch.setattr(fast_4bit, "finish", finish)
    monkeypatch.setattr(task, "model_class", Spy)
    monkeypatch.setenv("FASTLOAD_DIRECT_LOAD", "1")
    FastModel.from_pretrained(tiny_llama, store=False, lora=None)
    assert len(given_up) == 1 and alive_at_reread == [False]
