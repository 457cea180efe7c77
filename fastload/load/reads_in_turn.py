"""transformers' own loader kept from reading the whole checkpoint onto the GPU ahead of quantizing it.

Up to the 5.2x releases, transformers' from_pretrained reads every checkpoint tensor onto its device with a thread
pool, and converts and quantizes them afterwards; a 4-bit load on the fly then holds the 16-bit model on the GPU on
the way (the plain recipe's 8B load peaked at 15.4 GiB allocated on an H200 with transformers 5.17, 2026-12-04;
fastload's 4-bit MoE experts, quantized as each is registered, likewise held them all 16-bit first). Later releases
read in turn by themselves whenever they quantize on the fly; their switch, HF_DEACTIVATE_ASYNC_LOAD, does it on
every version that has the pool. Within `reads_in_turn(True)` it is on, unless the user set it either way.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

SWITCH = "HF_DEACTIVATE_ASYNC_LOAD"


class _Shared:
    """Loads inside the block now, and whether the switch was set here (then the last one out removes it)."""

    lock = threading.Lock()
    holders = 0
    set_here = False


@contextlib.contextmanager
def reads_in_turn(wanted: bool) -> Iterator[None]:
    """transformers reads one tensor at a time within the block when `wanted`; loads on several threads share it."""
    if not wanted:
        yield
        return
    with _Shared.lock:
        if _Shared.holders == 0:
            _Shared.set_here = SWITCH not in os.environ  # a value the user set, either way, stands
            if _Shared.set_here:
                os.environ[SWITCH] = "1"
        _Shared.holders += 1
    try:
        yield
    finally:
        with _Shared.lock:
            _Shared.holders -= 1
            if _Shared.holders == 0 and _Shared.set_here:
                os.environ.pop(SWITCH, None)
