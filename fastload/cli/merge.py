"""`fastload merge ADAPTER --out DIR`: the LoRA adapter merged into its base, saved as a model plain transformers
loads."""

from __future__ import annotations

import argparse

from fastload.cli.arguments import out_folder
from fastload.cli.output import EXIT_OK, emit
from fastload.errors import InvalidOption


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter_dir", help="folder holding adapter_config.json")
    parser.add_argument("--out", type=out_folder, required=True, help="folder to write the merged model to")
    parser.add_argument("--quantize", action="store_true",
                        help="write a bitsandbytes 4-bit checkpoint instead of 16-bit")
    parser.add_argument("--source", choices=("auto", "16bit", "dequantized"), default="auto",
                        help="merge into the 16-bit original (auto: when on this machine) or the dequantized 4-bit "
                             "weights")


def check_out(args: argparse.Namespace, plan) -> None:
    """Before minutes of loading: --out is writable and is none of the folders the merge reads (the adapter, the
    base it names, the 16-bit original): replacing one would lose what this merge starts from."""
    from fastload.atomic import check_writable, refuse_source

    asked = f"fastload merge {args.adapter_dir} --out {args.out}"
    refuse_source(args.out, [args.adapter_dir, plan.adapter, plan.location, plan.original], asked,
                  found="--out is the adapter or the model it is merged into (or lies inside or around one); "
                  "replacing it would lose the original")
    check_writable(args.out, asked)


def run(args: argparse.Namespace) -> int:
    from fastload.facade import FastModel
    from fastload.sources.resolve import resolve

    plan = resolve(args.adapter_dir)  # the plan alone tells, before minutes of loading
    if not plan.adapter:
        raise InvalidOption(f"Merging {args.adapter_dir}", found="it is a model, not a LoRA adapter directory",
                            fix="pass the folder holding adapter_config.json (what `fastload train --out` wrote)")
    check_out(args, plan)
    model, tokenizer = FastModel.from_pretrained(args.adapter_dir, gradient_checkpointing=False, engine=False)
    out = FastModel.save_merged(model, args.out, tokenizer=tokenizer, source=args.source, quantize=args.quantize)
    emit(args, {"adapter": args.adapter_dir, "out": str(out), "quantized": args.quantize},
         f"merged model saved in {out}" + (" (bitsandbytes 4-bit)" if args.quantize else ""))
    return EXIT_OK
