"""`fastload registry list | search QUERY | show NAME`: the registry of pre-quantized checkpoints."""

from __future__ import annotations

import argparse

from fastload.cli.output import EXIT_OK, emit
from fastload.errors import ModelNotFound


def entry_dict(entry) -> dict:
    return {"id": entry.id, "family": entry.family, "aliases": list(entry.aliases), "params": entry.params,
            "context_length": entry.context_length, "gated": entry.gated, "mirror": entry.mirror,
            "quantized": [q.id for q in entry.quantized], "packaged_gguf": entry.packaged_gguf, "origin": entry.origin}


def entry_line(entry) -> str:
    params = f"{entry.params / 1e9:6.2f}B" if entry.params else "      ?"
    alias = f"  ({', '.join(entry.aliases)})" if entry.aliases else ""
    return f"{params}  {entry.family:<12} {entry.id}{alias}"


def _emit_entries(args: argparse.Namespace, entries: list) -> int:
    emit(args, [entry_dict(e) for e in entries],
         "\n".join(entry_line(e) for e in entries) or "no registry entry matches")
    return EXIT_OK


def add_list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", help="only this family (model_type), e.g. llama, qwen2")


def list_entries(args: argparse.Namespace) -> int:
    from fastload.sources.registry import get_registry

    entries = list(get_registry().entries)
    return _emit_entries(args, [e for e in entries if e.family == args.family] if args.family else entries)


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query")


def search(args: argparse.Namespace) -> int:
    from fastload.sources.registry import get_registry

    return _emit_entries(args, get_registry().search(args.query))


def add_show_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="id, alias, mirror or quantized id")


def show(args: argparse.Namespace) -> int:
    from fastload.sources.registry import get_registry

    reg = get_registry()
    match = reg.find(args.name)
    if match is None:
        close = reg.closest(args.name)
        raise ModelNotFound(f"Showing the registry entry {args.name!r}", found="no registry entry has that name"
                            + (f"; closest: {', '.join(close)}" if close else ""),
                            fix="see `fastload registry search TEXT`")
    d = entry_dict(match.entry)
    shown = {**d, "params": f"{d['params'] / 1e9:.2f}B" if d["params"] else None}
    emit(args, d, "\n".join(f"{k}: {', '.join(v) if isinstance(v, list) else v}" for k, v in shown.items()
                            if v not in (None, [])))
    return EXIT_OK
