"""Backends turn a LoadPlan into a trainable model: native (transformers + bitsandbytes + peft) or unsloth."""

from __future__ import annotations

from typing import Protocol

from fastload._log import logger


class Backend(Protocol):
    name: str

    def load(self, plan, opts, store, lora, gradient_checkpointing, random_state): ...


def choose_backend(asked: str, plan, opts) -> Backend:
    """native unless asked otherwise; 'auto' takes unsloth only where it can run, and says why not otherwise."""
    from fastload.load.bitsandbytes_import import import_bitsandbytes

    import_bitsandbytes()  # first, before peft imports it without deferring its compiles
    from fastload.backends.native import NativeBackend

    if asked == "native":
        return NativeBackend()
    from fastload.backends.unsloth_backend import UnslothBackend, import_failure, unsloth_unavailable_reason

    reason = unsloth_unavailable_reason(plan, opts)
    if reason is None:
        logger.info("backend %s: importing unsloth (it patches transformers, peft and trl in this process)", asked)
        reason = import_failure()
    if asked == "unsloth":
        if reason:
            from fastload.errors import BackendUnavailable

            raise BackendUnavailable("backend='unsloth' was asked for", found=reason.found, fix=reason.fix)
        return UnslothBackend()
    if reason:
        logger.info("backend auto: native, because %s", reason.found)
        return NativeBackend()
    logger.info("backend auto: unsloth (installed, CUDA GPU, supported family)")
    return UnslothBackend()
