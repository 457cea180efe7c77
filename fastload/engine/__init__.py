"""The performance engine: speed-ups scoped to one loaded model instance, never to transformers' classes.

Each lever is a small module (fused_lora, fused_loss, offloaded_checkpoint, cuda_graphs, kernels; the Triton kernels
in triton/); `apply_engine(model, ...)` in apply.py turns on the ones that pay on this device and logs each. This
package imports none of them itself, so importing any one lever never runs the others.
"""

from __future__ import annotations

from typing import Any

# public names, imported from their module on first use (PEP 562)
_LAZY = {
    "apply_engine": "fastload.engine.apply",
    "levers_on": "fastload.engine.apply",
    "EngineSettings": "fastload.engine.apply",
    "LEVERS": "fastload.engine.apply",
    "EngineReport": "fastload.engine.report",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastload.engine' has no attribute {name!r}")
