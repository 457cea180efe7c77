"""The `fastload` command line: resolve, quantize, train, merge, generate, estimate, cache, registry, export, bench.

The commands are a table (PARSER_DATA in commands.py), each command in its own small module. This package imports
none of them itself, so a command module never runs the others; `import fastload.cli` never imports torch.
"""

from __future__ import annotations

from typing import Any

# public names, imported from commands.py on first use (PEP 562); `fastload = "fastload.cli:main"` is the script
_LAZY = ("main", "build_parser", "PARSER_DATA", "Command", "GROUP_HELP")

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from fastload.cli import commands

        return getattr(commands, name)
    raise AttributeError(f"module 'fastload.cli' has no attribute {name!r}")
