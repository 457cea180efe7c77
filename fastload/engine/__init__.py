"""The performance engine: speed-ups scoped to one loaded model instance, never to transformers' classes.

Each lever is a small module (fused_lora, fused_loss, offloaded_checkpoint, cuda_graphs, kernels, host_embedding;
the Triton kernels in triton/); `apply_engine(model, ...)` in apply.py turns on the ones that pay on this device and
logs each. This package imports none of them itself, so importing any one lever never runs the others.
"""

from __future__ import annotations

from fastload._lazy import lazy_getattr

# public names, each imported from its module on first use (PEP 562)
_LAZY = {**dict.fromkeys(("apply_engine", "reapply_engine", "levers_on", "EngineSettings", "LEVERS"),
                         "fastload.engine.apply"),
         "EngineReport": "fastload.engine.report"}
__all__ = list(_LAZY)
__getattr__ = lazy_getattr("fastload.engine", _LAZY)
