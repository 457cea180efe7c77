"""`fastload export gguf SOURCE --out FILE` and `fastload export hub SOURCE --repo user/name` on the command line.

SOURCE is a trained adapter folder (what `fastload train --out` wrote: base + adapter are loaded and merged) or a
merged 16-bit folder (converted as it is). Only argparse is imported here; the work happens in run().
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

QUANT_CHOICES = ("f16", "bf16", "q8_0", "f32", "q4_k_m", "q5_k_m", "q4_k_s", "q5_k_s", "q6_k", "q4_0")


def add_gguf_arguments(gguf: argparse.ArgumentParser) -> None:
    """`fastload export gguf`: one .gguf file for llama.cpp / Ollama, with an Ollama Modelfile."""
    gguf.add_argument("source", help="adapter folder (adapter_config.json) or merged 16-bit folder (config.json)")
    gguf.add_argument("--out", required=True, help="the .gguf file to write (Modelfile goes beside it)")
    gguf.add_argument("--quant", choices=QUANT_CHOICES, default="q8_0",
                      help="q8_0 (default), f16, bf16: written by fastload; k-quants need llama-cpp-python")
    gguf.add_argument("--source-weights", choices=("auto", "16bit", "dequantized"), default="auto",
                      help="merge into the 16-bit original (auto: when on this machine) or the dequantized weights")
    gguf.add_argument("--no-modelfile", action="store_true", help="do not write the Ollama Modelfile")
    gguf.add_argument("--no-verify", action="store_true", help="skip measuring what the merge cost")


def add_hub_arguments(hub: argparse.ArgumentParser) -> None:
    """`fastload export hub`: build the folder with a model card and upload it in one commit."""
    hub.add_argument("source", help="adapter folder (adapter_config.json, what `fastload train --out` wrote)")
    hub.add_argument("--repo", required=True, help="user/name on the Hub (created private unless --public)")
    hub.add_argument("--what", choices=("adapter", "merged", "merged-4bit", "gguf"), default="adapter",
                     help="what to upload (default: the adapter alone)")
    hub.add_argument("--quant", choices=QUANT_CHOICES, default="q8_0", help="GGUF type with --what gguf")
    hub.add_argument("--public", action="store_true", help="create the repository public")




def run_hub(args: argparse.Namespace) -> int:
    """The token comes from huggingface_hub's login or HF_TOKEN, never from the command line (shell history)."""
    from fastload.export.hub import push_to_hub
    from fastload.facade import FastModel

    model, tokenizer = FastModel.from_pretrained(args.source, gradient_checkpointing=False, engine=False)
    url = push_to_hub(model, args.repo, tokenizer, what=args.what, private=not args.public, quantization=args.quant)
    data = {"source": args.source, "repo": args.repo, "what": args.what, "commit": url}
    print(json.dumps(data, indent=2) if getattr(args, "json", False) else f"pushed {args.what} to {url}")
    return 0


def run_gguf(args: argparse.Namespace) -> int:
    from fastload.export.gguf import save_gguf

    source = Path(args.source).expanduser()
    options = {"quantization": args.quant, "modelfile": not args.no_modelfile}
    if (source / "adapter_config.json").is_file():
        from fastload.facade import FastModel

        model, tokenizer = FastModel.from_pretrained(str(source), gradient_checkpointing=False, engine=False)
        out = save_gguf(model, args.out, tokenizer, source=args.source_weights, verify=not args.no_verify, **options)
    else:
        out = save_gguf(source, args.out, **options)
    data = {"source": str(source), "out": str(out), "quantization": args.quant,
            "modelfile": None if args.no_modelfile else str(out.parent / "Modelfile")}
    print(json.dumps(data, indent=2) if getattr(args, "json", False) else f"GGUF written to {out}")
    return 0
