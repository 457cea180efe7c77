"""Import bitsandbytes without paying for torch's compiler at import time.

bitsandbytes wraps its pure-PyTorch fallback kernels in `torch.compile` as it is imported. That call alone imports
torch's inductor stack: about 0.6 s of every process on the GPU hosts, 0.8 s on a 2-core CPU. A GPU process never runs
those kernels (the CUDA ones take the same ops), and a CPU process needs the compiler only when one first runs.
Imported through here, each such function is compiled at its first call: the same compiled kernel, later.
"""

from __future__ import annotations

import functools
import sys
import threading
import types

_LOCK = threading.Lock()


def import_bitsandbytes():
    """`import bitsandbytes`, with its import-time `torch.compile` calls deferred to each function's first call.

    Once bitsandbytes is imported (by the user, peft, or an earlier call) this is a plain lookup.
    """
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    import torch

    with _LOCK:
        real_compile = torch.compile
        torch.compile = _deferring(real_compile)
        try:
            import bitsandbytes
        finally:
            torch.compile = real_compile
    return bitsandbytes


def _deferring(real_compile):
    """A stand-in for `torch.compile` that compiles a plain function on its first call; anything else (a module, a
    call without a function) goes to torch at once, so no caller can tell the difference but the time."""

    def deferred_compile(model=None, **options):
        if model is None:
            return lambda fn: deferred_compile(fn, **options)
        if not isinstance(model, types.FunctionType):
            return real_compile(model, **options)
        compiled = []

        @functools.wraps(model)
        def first_call_compiles(*args, **kwargs):
            if not compiled:
                try:
                    compiled.append(real_compile(model, **options))
                except Exception:  # where torch.compile refuses, the function as it is (bitsandbytes' own fallback)
                    compiled.append(model)
            return compiled[0](*args, **kwargs)

        return first_call_compiles

    return deferred_compile
