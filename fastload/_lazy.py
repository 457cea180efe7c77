"""Package attributes imported on first use (PEP 562): how a package keeps its public names without importing the
modules behind them, so importing one submodule never runs its siblings (and `import fastload` stays light)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package`: `names` maps each public attribute to the module defining it.

    Args:
        package: the package's dotted name (for the AttributeError's message).
        names: attribute name -> module path, e.g. {"apply_engine": "fastload.engine.apply"}.
    Returns:
        The function to assign to the package's `__getattr__`.
    """

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return __getattr__
