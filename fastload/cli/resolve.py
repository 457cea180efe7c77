"""`fastload resolve NAME`: the load plan for a name and why, without loading anything."""

from __future__ import annotations

import argparse

from fastload.cli.output import EXIT_OK, emit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="hub id, registry alias, local directory, adapter directory or .gguf file")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit)")
    parser.add_argument("--no-store", action="store_true", help="ignore fastload's store of quantized checkpoints")


def plan_dict(plan) -> dict:
    return {"name": plan.name, "source": plan.source, "location": plan.location, "prequantized": plan.prequantized,
            "quantization": plan.quant.describe(), "reason": plan.reason, "revision": plan.revision,
            "original": plan.original, "adapter": plan.adapter, "store_key": plan.store_key,
            "will_download": plan.will_download, "registry_id": plan.registry_entry.id if plan.registry_entry else None,
            "tried": list(plan.tried)}


def run(args: argparse.Namespace) -> int:
    from fastload.sources.resolve import resolve

    plan = resolve(args.name, revision=args.revision, store=not args.no_store)
    emit(args, plan_dict(plan), plan.explain())
    return EXIT_OK
