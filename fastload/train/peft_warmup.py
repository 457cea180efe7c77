"""peft's first LoRA injection into a transformers 5 model builds transformers' table of checkpoint renamings for
every architecture it knows (about a thousand regular expressions compiled; 0.05 s on a CI core, up to ~0.4 s
measured inside an 8B load on an H200 host). Built on a thread while the weights are read instead, where the
loading thread mostly waits for the readers and the GPU; peft then finds it made."""

from __future__ import annotations

import threading


def start_peft_warmup() -> threading.Thread | None:
    """Start building the table on a daemon thread; None where transformers has no such table."""
    try:  # imported here, on the caller's thread: transformers' lazy imports are not safe from two threads at once
        from transformers import conversion_mapping
    except ImportError:
        return None
    build = getattr(conversion_mapping, "get_checkpoint_conversion_mapping", None)
    if build is None:
        return None
    thread = threading.Thread(target=_build, args=(build,), daemon=True, name="fastload-peft-warmup")
    thread.start()
    return thread


def _build(build) -> None:
    try:
        build("llama")  # any name: the first call builds (and caches) the table for all of them
    except Exception:  # noqa: BLE001 - peft builds it itself then, as without the warm-up
        pass


def finish_peft_warmup(thread: threading.Thread | None) -> None:
    """Wait for the table (before peft's injection would build it a second time)."""
    if thread is not None:
        thread.join()
