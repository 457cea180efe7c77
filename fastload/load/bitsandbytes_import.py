"""Import bitsandbytes without paying for torch's compiler at import time.

bitsandbytes wraps its pure-PyTorch fallback kernels in `torch.compile` as it is imported. That call alone imports
torch's inductor stack: about 0.6 s of every process on the GPU hosts, 0.8 s on a 2-core CPU. A GPU process never runs
those kernels (the CUDA ones take the same ops), and a CPU process needs the compiler only when one first runs.
Imported through here, each such function is compiled at its first call: the same compiled kernel, later.

On CPUs with AVX512-BF16, bitsandbytes 0.50 also asks the Hub for a kernel (`kernels.get_kernel`, code from
kernels-community) as it is imported, and warns when that fails, as it does offline or under the publisher check of
kernels 0.19: a network call and remote code at import, neither of which fastload lets in unasked. Imported through
here, the `kernels` package is hidden for the import's duration, bitsandbytes keeps its own CPU kernel, and the
warning about the missing Hub kernel becomes a debug line.
"""

from __future__ import annotations

import contextlib
import functools
import logging
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

    with _LOCK, _without_hub_kernels():
        real_compile = torch.compile
        torch.compile = _deferring(real_compile)
        try:
            import bitsandbytes
        finally:
            torch.compile = real_compile
    return bitsandbytes


HUB_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"
HUB_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


@contextlib.contextmanager
def _without_hub_kernels():
    """`import kernels` fails while this holds (unless the process imported it already), and bitsandbytes' warning
    about the Hub kernel it then cannot fetch goes to fastload's debug log."""
    hidden = "kernels" not in sys.modules
    if hidden:
        sys.modules["kernels"] = None  # an ImportError at `from kernels import ...`, without a search
    log = logging.getLogger(HUB_KERNEL_LOGGER)
    quiet = _HubKernelNotice()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)
        if hidden and sys.modules.get("kernels", 0) is None:
            del sys.modules["kernels"]


class _HubKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(HUB_KERNEL_WARNING):
            return True
        from fastload._log import logger

        logger.debug("bitsandbytes runs its own CPU 4-bit kernel: its Hub kernel (kernels-community) is not fetched")
        return False


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
