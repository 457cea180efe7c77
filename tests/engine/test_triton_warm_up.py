"""Triton's once-per-process imports and cache key, paid during the load (fastload.engine.triton.warm_up).

What a user would notice: a broken or unusual Triton must never break a load (the warm-up is an extra), a CPU load
must not start threads for kernels it never runs, and on a GPU the first step must find the work already done.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import types

import pytest

from fastload import FastModel
from fastload.engine.triton import warm_up


def fake_triton(monkeypatch, key):
    """A stand-in `triton` whose compiler modules import and whose cache key is `key` (to see what warm_triton
    does with a Triton that is not installed here)."""
    modules = {name: types.ModuleType(name) for name in
               ("triton", "triton.runtime", "triton.runtime.cache", "triton.compiler", "triton.compiler.compiler",
                "triton.backends", "triton.backends.nvidia", "triton.backends.nvidia.compiler")}
    modules["triton.runtime.cache"].triton_key = key
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


def test_warm_up_computes_tritons_cache_key_once(monkeypatch):
    calls = []
    fake_triton(monkeypatch, lambda: calls.append(1) or "key")
    done = warm_up.warm_triton()
    assert calls == [1]
    assert "triton.runtime.cache.triton_key" in done and "triton.compiler.compiler" in done


def test_a_failing_triton_never_breaks_the_warm_up(monkeypatch):
    def broken():
        raise RuntimeError("cannot hash sources")

    fake_triton(monkeypatch, broken)
    monkeypatch.delitem(sys.modules, "triton.backends.nvidia.compiler")
    monkeypatch.setattr(warm_up, "COMPILER_MODULES", ("triton.compiler.compiler", "triton.no_such_module"))
    assert warm_up.warm_triton() == ["triton.compiler.compiler"]


def test_a_cpu_load_starts_no_warm_up_thread(tiny_llama):
    seen = []
    original = threading.Thread.start

    def recording_start(self):
        seen.append(self.name)
        return original(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(threading.Thread, "start", recording_start)
        model, _ = FastModel.from_pretrained(tiny_llama, store=False)
    assert "fastload-triton-warm-up" not in seen
    assert not any(name.startswith("triton_warm_up") for name in model.fastload.load_phases)


@pytest.mark.gpu
def test_on_a_gpu_the_load_leaves_the_first_step_tritons_key_ready(tiny_llama, tmp_path):
    """In a fresh process (Triton memoizes its key per process): after from_pretrained the key is computed, the
    load recorded the warm-up, and a training step runs."""
    script = textwrap.dedent(f"""
        import importlib, json, torch
        from fastload import FastModel
        model, tok = FastModel.from_pretrained({str(tiny_llama)!r}, store=False)
        phases = model.fastload.load_phases
        key = next(getattr(importlib.import_module(m), f, None) for m, f in
                   (("triton.runtime.cache", "triton_key"), ("triton.compiler.compiler", "triton_key"))
                   if getattr(importlib.import_module(m), f, None) is not None)
        ready = key.cache_info().currsize if hasattr(key, "cache_info") else None
        ids = torch.randint(0, 100, (1, 64), device="cuda")
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        print(json.dumps({{"overlapped": phases.get("triton_warm_up_overlapped"), "key_ready": ready,
                          "loss": loss.item()}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "FASTLOAD_HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["overlapped"] is not None and result["overlapped"] > 0
    assert result["key_ready"] in (None, 1)
    assert math.isfinite(result["loss"])
