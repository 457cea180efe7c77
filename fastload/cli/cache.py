"""`fastload cache list | rm KEY | verify`: fastload's store of quantized checkpoints."""

from __future__ import annotations

import argparse

from fastload.cli.output import EXIT_OK, emit
from fastload.errors import StoreError


def entry_dict(entry) -> dict:
    return {"key": entry.key, "source": entry.source, "path": str(entry.path), "bytes": entry.size_bytes,
            "created": entry.manifest.get("created"), "damaged": bool(entry.manifest.get("damaged"))}


def list_entries(args: argparse.Namespace) -> int:
    from fastload.sources.store import Store

    store = Store()
    entries = [entry_dict(e) for e in store.entries()]
    lines = [f"{e['key']}  {e['bytes'] / 1e6:9.1f} MB  {e['source']}" + ("  (damaged)" if e["damaged"] else "")
             for e in entries]
    emit(args, {"root": str(store.root), "entries": entries},
         "\n".join([f"store: {store.root}"] + (lines or ["  (empty)"])))
    return EXIT_OK


def add_rm_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("key", help="entry key (from `fastload cache list`) or source id/path")


def remove(args: argparse.Namespace) -> int:
    from fastload.sources.store import Store

    store = Store()
    removed = store.remove(args.key)
    if not removed:
        keys = ", ".join(e.key for e in store.entries()) or "none"
        raise StoreError(f"Removing {args.key!r} from the store {store.root}", found=f"no entry has that key or "
                         f"source; keys: {keys}", fix="see `fastload cache list`")
    emit(args, {"removed": [entry_dict(e) for e in removed]},
         "\n".join(f"removed {e.key} ({e.source})" for e in removed))
    return EXIT_OK


def verify(args: argparse.Namespace) -> int:
    from fastload.sources.store import Store

    store = Store()
    data = [{**entry_dict(e), "problem": problem} for e, problem in store.verify()]
    lines = [f"{d['key']}  {'ok' if not d['problem'] else 'DAMAGED: ' + d['problem']}  {d['source']}" for d in data]
    emit(args, {"root": str(store.root), "entries": data},
         "\n".join([f"store: {store.root}"] + (lines or ["  (empty)"])))
    bad = [d for d in data if d["problem"]]
    if bad:
        raise StoreError("Verifying the store", found=f"{len(bad)} damaged entr{'y' if len(bad) == 1 else 'ies'}: "
                         + ", ".join(d["key"] for d in bad),
                         fix="remove them with `fastload cache rm KEY`; the next load quantizes again")
    return EXIT_OK
