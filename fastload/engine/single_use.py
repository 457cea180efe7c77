"""Whether the autograd graph being built now will be backpropagated exactly once.

A kernel's backward may then overwrite the tensors its forward saved (their buffers become the gradients, no second
allocation as large as the activations). That holds inside the engine's recomputation (each backward rebuilds the
layer's graph and runs it once) and not in general: a user's `backward(retain_graph=True)` followed by a second
backward reads the saved tensors again. Thread-local: recomputation runs on the autograd engine's threads.
"""

from __future__ import annotations

import contextlib
import threading

_local = threading.local()


@contextlib.contextmanager
def single_use_graph():
    """Graphs built inside are backpropagated once, right after (the engine's recomputation, a graph's capture)."""
    depth = getattr(_local, "depth", 0)
    _local.depth = depth + 1
    try:
        yield
    finally:
        _local.depth = depth


def graph_is_single_use() -> bool:
    return getattr(_local, "depth", 0) > 0
