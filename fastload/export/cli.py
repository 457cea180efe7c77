"""`fastload export gguf SOURCE --out FILE`: the GGUF exit on the command line.

SOURCE is a trained adapter folder (what `fastload train --out` wrote: base + adapter are loaded and merged) or a
merged 16-bit folder (converted as it is). Only argparse is imported here; the work happens in run().
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

QUANT_CHOICES = ("f16", "bf16", "q8_0", "f32", "q4_k_m", "q5_k_m", "q4_k_s", "q5_k_s", "q6_k", "q4_0")


def add_arguments(parser: argparse.ArgumentParser, parents: list[argparse.ArgumentParser] = ()) -> None:
    """The `export` command's formats (one so far: gguf) and their options; parents: the CLI's shared flags."""
    formats = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    gguf = formats.add_parser("gguf", help="one .gguf file for llama.cpp / Ollama, with an Ollama Modelfile",
                              description="merge the adapter (if SOURCE is one) and write one .gguf file",
                              parents=list(parents))
    gguf.add_argument("source", help="adapter folder (adapter_config.json) or merged 16-bit folder (config.json)")
    gguf.add_argument("--out", required=True, help="the .gguf file to write (Modelfile goes beside it)")
    gguf.add_argument("--quant", choices=QUANT_CHOICES, default="q8_0",
                      help="q8_0 (default), f16, bf16: written by fastload; k-quants need llama-cpp-python")
    gguf.add_argument("--source-weights", choices=("auto", "16bit", "dequantized"), default="auto",
                      help="merge into the 16-bit original (auto: when on this machine) or the dequantized weights")
    gguf.add_argument("--no-modelfile", action="store_true", help="do not write the Ollama Modelfile")
    gguf.add_argument("--no-verify", action="store_true", help="skip measuring what the merge cost")


def run(args: argparse.Namespace) -> int:
    """Export as asked; prints the written path (JSON with --json). Returns the exit code."""
    from .gguf import save_gguf

    source = Path(args.source).expanduser()
    options = {"quantization": args.quant, "modelfile": not args.no_modelfile}
    if (source / "adapter_config.json").is_file():
        from ..facade import FastModel

        model, tokenizer = FastModel.from_pretrained(str(source), gradient_checkpointing=False, engine=False)
        out = save_gguf(model, args.out, tokenizer, source=args.source_weights, verify=not args.no_verify, **options)
    else:
        out = save_gguf(source, args.out, **options)
    data = {"source": str(source), "out": str(out), "quantization": args.quant,
            "modelfile": None if args.no_modelfile else str(out.parent / "Modelfile")}
    print(json.dumps(data, indent=2) if getattr(args, "json", False) else f"GGUF written to {out}")
    return 0
