"""The CUDA allocator choice: fastload turns on expandable segments only where the user configured nothing."""

from __future__ import annotations

import pytest

from fastload.load import devices


@pytest.fixture(autouse=True)
def fresh_choice():
    devices.use_expandable_segments.cache_clear()
    yield
    devices.use_expandable_segments.cache_clear()


def test_a_users_allocator_setting_is_kept(monkeypatch):
    calls = []
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    monkeypatch.setattr(devices.torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    assert devices.use_expandable_segments() is False
    assert calls == []


def test_without_a_setting_expandable_segments_are_asked_for_once(monkeypatch):
    calls = []
    for name in devices.ALLOCATOR_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(devices.torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    assert devices.use_expandable_segments() is True
    assert devices.use_expandable_segments() is True
    assert calls == ["expandable_segments:True"]


def test_an_allocator_that_refuses_leaves_the_load_going(monkeypatch):
    def refuse(setting):
        raise RuntimeError("not supported by this allocator")

    for name in devices.ALLOCATOR_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(devices.torch._C, "_accelerator_setAllocatorSettings", refuse, raising=False)
    assert devices.use_expandable_segments() is False
