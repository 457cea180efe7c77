"""The interpreter's switch interval, shortened while LoRA's initial values are drawn beside peft, comes back as it
was however loads on several threads overlap or fail (fastload.train.adapter_draws.sharing_the_interpreter)."""

from __future__ import annotations

import sys

import pytest

from fastload.train.adapter_draws import sharing_the_interpreter


def test_overlapping_and_failing_draws_restore_the_switch_interval():
    before = sys.getswitchinterval()
    first = sharing_the_interpreter()
    first.__enter__()
    assert sys.getswitchinterval() == pytest.approx(min(before, 0.0005))
    second = sharing_the_interpreter()
    second.__enter__()
    first.__exit__(None, None, None)  # the first one out is not the last: the short interval stays for the second
    assert sys.getswitchinterval() == pytest.approx(min(before, 0.0005))
    second.__exit__(None, None, None)
    assert sys.getswitchinterval() == before
    with pytest.raises(RuntimeError), sharing_the_interpreter():
        raise RuntimeError("peft failed")
    assert sys.getswitchinterval() == before


def test_draws_keep_the_dtype_of_the_thread_that_asked_for_them():
    """transformers sets the default dtype process-wide while it loads; a load doing so while the draws run on
    their thread must not turn them into another dtype than peft, on the caller's thread, draws in."""
    import torch

    from fastload.train.adapter_draws import AdapterDraws, draw_like_peft

    adapters = [((16, 256), (256, 16), torch.device("cpu"))] * 64
    before = torch.get_default_dtype()
    try:
        draws = AdapterDraws(adapters)
        torch.set_default_dtype(torch.bfloat16)  # a load elsewhere, while the thread draws
        kept, _ = draws.result(adapters)
    finally:
        torch.set_default_dtype(before)
    assert {a.dtype for a in kept} == {before}
    expected, _ = draw_like_peft(adapters, draws._start, before)
    assert all(torch.equal(a, b) for a, b in zip(kept, expected))


def test_draws_on_their_thread_share_the_interpreter_while_they_run(monkeypatch):
    """The early draws run beside the weight read, where the readers and the loading thread hold the interpreter:
    the drawing thread gets it back every 0.5 ms while it draws, and the interval is as before once it is done."""
    import torch

    from fastload.train import adapter_draws

    seen = []

    def draw(adapters, start, dtype=None):
        seen.append(sys.getswitchinterval())
        return [], start

    monkeypatch.setattr(adapter_draws, "draw_like_peft", draw)
    before = sys.getswitchinterval()
    draws = adapter_draws.AdapterDraws([], torch.get_rng_state())
    assert draws.result([]) is not None
    assert seen == [pytest.approx(min(before, 0.0005))]
    assert sys.getswitchinterval() == before
