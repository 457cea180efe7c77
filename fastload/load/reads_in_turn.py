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
from collections.abc import Iterator

from fastload.shared_setting import SharedSetting

SWITCH = "HF_DEACTIVATE_ASYNC_LOAD"


def _switch_on() -> bool:
    """Turn the switch on; True when it was set here (a value the user set, either way, stands)."""
    if SWITCH in os.environ:
        return False
    os.environ[SWITCH] = "1"
    return True


def _switch_back(set_here: bool) -> None:
    if set_here:
        os.environ.pop(SWITCH, None)


_SWITCH = SharedSetting(_switch_on, _switch_back)


@contextlib.contextmanager
def reads_in_turn(wanted: bool) -> Iterator[None]:
    """transformers reads one tensor at a time within the block when `wanted`; loads on several threads share it."""
    if not wanted:
        yield
        return
    with _SWITCH.held():
        yield
