"""Triton's once-per-process costs, paid on a thread while the weights are read instead of in the first step.

A fresh process's first training step imports Triton's compiler and hashes Triton's own sources into the key of its
kernel cache before the first cached kernel can load (~0.5 s of a 1.3-1.6 s first step on the H100 host,
`benchmarks/first_step_profile.py`). Neither depends on the model, so the load's waits on the disk can hide them.
The load joins the thread before it returns, so no kernel launches while it runs; it touches no GPU (a CUDA call on
a new thread would open a context on device 0, whatever device the user picked).
"""

from __future__ import annotations

import importlib
import threading
import time

from fastload._log import logger
from fastload.load.phases import add as add_phase
from fastload.load.phases import phase

# modules Triton's first compile-or-cache-hit imports, and where its source-hash key lives across versions
COMPILER_MODULES = ("triton.compiler.compiler", "triton.backends.nvidia.compiler")
KEY_FUNCTIONS = (("triton.runtime.cache", "triton_key"), ("triton.compiler.compiler", "triton_key"))


def warm_triton() -> list[str]:
    """Import Triton's compiler and compute its cache key (memoized by Triton); returns what it did, for the log.
    Anything that fails is skipped: the first kernel then pays it, as without this."""
    done = []
    for name in COMPILER_MODULES:
        try:
            importlib.import_module(name)
            done.append(name)
        except Exception as e:  # noqa: BLE001 - a warm-up never breaks a load
            logger.debug("triton warm-up: %s not imported (%s: %s)", name, type(e).__name__, e)
    for module, function in KEY_FUNCTIONS:
        try:
            key = getattr(importlib.import_module(module), function, None)
            if key is None:
                continue
            key()
        except Exception as e:  # noqa: BLE001
            logger.debug("triton warm-up: %s.%s failed (%s: %s)", module, function, type(e).__name__, e)
            continue
        done.append(f"{module}.{function}")
        break
    return done


class TritonWarmUp:
    """warm_triton() on a daemon thread from start() to join(); a no-op where the engine's kernels will not run."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._seconds = 0.0

    def start(self, device_type: str) -> TritonWarmUp:
        from fastload.engine.triton.launch import triton_available

        if triton_available(device_type):  # also points Triton's cache under FASTLOAD_HOME, before Triton reads it
            self._thread = threading.Thread(target=self._run, daemon=True, name="fastload-triton-warm-up")
            self._thread.start()
        return self

    def _run(self) -> None:
        started = time.perf_counter()
        done = warm_triton()
        self._seconds = time.perf_counter() - started
        logger.debug("triton warm-up: %s in %.2f s", ", ".join(done) or "nothing", self._seconds)

    def join(self) -> None:
        """Wait for the thread (normally long done); its own time is recorded as triton_warm_up_overlapped."""
        if self._thread is None:
            return
        with phase("triton_warm_up_wait"):
            self._thread.join()
        add_phase("triton_warm_up_overlapped", self._seconds)
        self._thread = None
