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
