"""When Unsloth-style code is seen, make trl accept its keywords (fastload.compat.trl_compat); without TRL, nothing
to do. Kept apart so the facade can call it without importing TRL or the Unsloth surface."""

from __future__ import annotations


def install_trl_compat() -> None:
    """trl.SFTTrainer / trl.SFTConfig as Unsloth notebooks call them; once per process, logged."""
    try:
        from fastload.compat import trl_compat
    except ImportError:
        return
    trl_compat.install()
