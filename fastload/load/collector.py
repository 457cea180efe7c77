"""Python's garbage collector during a load: full collections walk only the objects the load made.

A full (oldest-generation) collection walks every tracked object of the process, ~450k once torch, transformers
and peft are imported (~0.25 s on a slow core), and building, quantizing and adapting a model's ~2,000 modules
allocates enough to set one off mid-load. None of the objects alive before the load can become garbage because of
it, so they are frozen out of collections (gc.freeze) while it runs; what the load makes and drops is collected as
usual. Measurements: benchmarks/README.md (loading overheads).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collect_new_objects_only() -> Iterator[None]:
    """Freeze the objects alive now out of the collector's walks until the block ends.

    Left alone when the collector is off or something else already froze objects (gc.unfreeze would undo its
    freeze too).
    """
    if not gc.isenabled() or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
