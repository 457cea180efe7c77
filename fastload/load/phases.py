"""Where a load's time goes: seconds per phase (config, checks, reading, quantization, tokenizer, LoRA...).

FastModel.from_pretrained records one load's phases and leaves them on the model (`model.fastload.load_phases`);
the benchmark reports them. A phase is timed on the calling thread only (the reader threads' own time shows as
the main thread's wait for them, `read_wait`); nested or repeated phases of one name add up. On a GPU the times are
host time: an asynchronous copy or kernel is counted where the host next waits for it.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator

_phases: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("fastload_load_phases",
                                                                                   default=None)


@contextlib.contextmanager
def recording() -> Iterator[dict[str, float]]:
    """Record the phases of everything run inside (this thread); yields the dict, filled as phases end."""
    phases: dict[str, float] = {}
    token = _phases.set(phases)
    try:
        yield phases
    finally:
        _phases.reset(token)


def add(name: str, seconds: float) -> None:
    """Count `seconds` to phase `name` of the load being recorded (nothing when none is)."""
    phases = _phases.get()
    if phases is not None:
        phases[name] = phases.get(name, 0.0) + seconds


@contextlib.contextmanager
def phase(name: str, within: str | None = None) -> Iterator[None]:
    """Time the block as phase `name`; `within`: the enclosing phase it is split off from (that one keeps the rest),
    so that the phases still add up to the load's time."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - started
        add(name, seconds)
        if within is not None:
            add(within, -seconds)
