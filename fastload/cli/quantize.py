"""`fastload quantize SOURCE [--out DIR]`: a bitsandbytes 4-bit checkpoint, into fastload's store or a folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastload.cli.arguments import out_folder
from fastload.cli.output import EXIT_OK, emit, note
from fastload.errors import InvalidOption, StoreError
from fastload.model_state import state_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="the 16-bit model: hub id, registry name, local directory or .gguf file (with "
                        "--out, a 4-bit checkpoint already on disk is copied as it is: --quant-type and "
                        "--no-double-quant then do not apply)")
    parser.add_argument("--out", type=out_folder,
                        help="write the checkpoint to this folder instead of fastload's store")
    parser.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit data type (default nf4)")
    parser.add_argument("--no-double-quant", action="store_true", help="keep the absmax scales in fp32")


def run(args: argparse.Namespace) -> int:
    from fastload.facade import FastModel
    from fastload.load.loader import LoadOptions, local_files_of
    from fastload.save.quantized import copy_prequantized, save_quantized
    from fastload.sources.resolve import make_store, resolve

    quant = {"bnb_4bit_quant_type": args.quant_type, "bnb_4bit_use_double_quant": not args.no_double_quant}
    if args.out:
        plan = resolve(args.source, store=make_store(True) or False, **quant)
        check_out(args, [args.source, plan.location, plan.original])
        files = local_files_of(plan, LoadOptions()) if plan.prequantized else None
        if files is not None:  # a 4-bit checkpoint already on this machine is copied as it is, without loading it
            note(args, f"copying the 4-bit checkpoint {plan.location}")
            return done(args, plan, copy_prequantized(Path(files), args.out, asked(args)), True)
    note(args, f"loading {args.source} in 4-bit (quantizing on the fly unless a quantized copy exists)")
    # MoE experts kept as loaded: the checkpoint then holds their 16-bit values, which every load quantizes again
    model, tokenizer = FastModel.from_pretrained(args.source, lora=None, gradient_checkpointing=False, engine=False,
                                                 quantize_experts=False, **quant)
    plan = state_of(model).plan
    if not args.out:
        return done(args, plan, *stored(args, plan))
    refuse_source(args, [plan.location, plan.original])  # where the load really found it (a download)
    if not plan.prequantized:
        return done(args, plan, save_quantized(model, tokenizer, args.out), True)
    files = local_files_of(plan, LoadOptions())  # a 4-bit checkpoint downloaded while loading it: copied as it is
    if files is None:
        raise StoreError(f"Copying {args.source} to {args.out}", found=f"the files of {plan.location} are "
                         "not on this machine after loading it", fix="download it into the Hugging Face "
                         "cache (huggingface-cli download) and run the command again")
    return done(args, plan, copy_prequantized(Path(files), args.out, asked(args)), True)


def asked(args: argparse.Namespace) -> str:
    return f"fastload quantize {args.source} --out {args.out}"


def refuse_source(args: argparse.Namespace, sources: list) -> None:
    """--out must not be (or lie in, or hold) what is quantized: the original would be replaced."""
    from fastload import atomic

    atomic.refuse_source(args.out, sources, asked(args), found="--out is the checkpoint being quantized, or lies "
                         "inside the checkpoint, or holds it: the original would be replaced")


def check_out(args: argparse.Namespace, sources: list) -> None:
    """Before loading: --out is writable and is not what is quantized."""
    from fastload.atomic import check_writable

    refuse_source(args, sources)
    check_writable(args.out, asked(args))


def stored(args: argparse.Namespace, plan) -> tuple[Path, bool]:
    """Where the store holds the 4-bit checkpoint of `plan` and whether this run wrote it."""
    from fastload.load.background_store import wait_for_store_writes
    from fastload.sources import plan as P
    from fastload.sources.store import Store

    if plan.source == P.STORE:
        return Path(plan.location), False
    if plan.prequantized:
        raise InvalidOption(f"Quantizing {args.source} into the store",
                            found=f"it is already a quantized checkpoint ({plan.location}); the store keeps only "
                                  "checkpoints fastload quantized itself",
                            fix="load it as it is, or pass --out DIR to write a copy")
    wait_for_store_writes()  # a load on a GPU writes its entry in the background, after a first training step
    entry = Store().lookup(plan.store_key) if plan.store_key else None
    if entry is None:
        raise StoreError(f"Quantizing {args.source} into the store", found="no store entry was written",
                         fix="check FASTLOAD_HOME is writable, or pass --out DIR")
    return entry.path, True


def written_quantization(where: Path, plan) -> str:
    """The quantization of what is at `where` (its config), which for a copied checkpoint may differ from what
    was asked (a 4-bit checkpoint is copied as it is)."""
    try:
        q = json.loads((where / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return plan.quant.describe()
    if q.get("load_in_4bit"):
        double = "+double quant" if q.get("bnb_4bit_use_double_quant") else ""
        return f"4-bit {q.get('bnb_4bit_quant_type', 'nf4')}{double}"
    return "8-bit" if q.get("load_in_8bit") else plan.quant.describe()


def done(args: argparse.Namespace, plan, where: Path, written: bool) -> int:
    size = sum(f.stat().st_size for f in where.iterdir() if f.is_file())
    data = {"source": args.source, "path": str(where), "written": written, "bytes": size,
            "quantization": written_quantization(where, plan), "plan_source": plan.source}
    verb = "wrote" if written else "already stored:"
    emit(args, data, f"{verb} {where} ({size / 1e6:.1f} MB, {data['quantization']})")
    return EXIT_OK
