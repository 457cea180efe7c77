"""The `fastload` command line: resolve, quantize, train, merge, generate, estimate, cache, registry, export, bench.

The commands are a table (PARSER_DATA in commands.py), each command in its own small module. This package imports
none of them itself, so a command module never runs the others; `import fastload.cli` never imports torch.
"""

from __future__ import annotations

from fastload._lazy import lazy_getattr

# public names, imported from commands.py on first use (PEP 562); `fastload = "fastload.cli:main"` is the script
_LAZY = ("main", "build_parser", "PARSER_DATA", "Command", "GROUP_HELP")

__all__ = list(_LAZY)


__getattr__ = lazy_getattr("fastload.cli", dict.fromkeys(_LAZY, "fastload.cli.commands"))
