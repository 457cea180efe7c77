"""Whether the autograd graph being built now will be backpropagated exactly once.

A kernel's backward may then overwrite the tensors its forward saved (their buffers become the gradients, no second
allocation as large as the activations). That holds under checkpointing, which recomputes a layer's saved tensors for
every backward (torch's non-reentrant checkpoint, the engine's own), and not in general: without it, a user's
`backward(retain_graph=True)` followed by a second backward reads the saved tensors again. Thread-local:
recomputation runs on the autograd engine's threads.
"""

from __future__ import annotations

import threading

_local = threading.local()


class _SingleUse:
    """A context manager that may be entered again after it exits: torch's checkpoint re-enters its recomputation
    context for every backward (a retained graph's second one included)."""

    def __enter__(self) -> None:
        _local.depth = getattr(_local, "depth", 0) + 1

    def __exit__(self, *exc) -> bool:
        _local.depth -= 1
        return False


def single_use_graph() -> _SingleUse:
    """Graphs built inside are backpropagated once, right after (the engine's recomputation, a graph's capture)."""
    return _SingleUse()


def graph_is_single_use() -> bool:
    return getattr(_local, "depth", 0) > 0


def single_use_contexts():
    """`context_fn` for torch's non-reentrant checkpoint: the layer's forward and its recomputation both build
    single-use graphs (the forward's saved tensors are dropped and recomputed for each backward)."""
    return single_use_graph(), single_use_graph()
