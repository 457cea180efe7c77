"""`fastload generate MODEL --prompt TEXT`: text from a model or a trained adapter."""

from __future__ import annotations

import argparse

from fastload.cli.arguments import message, non_negative_float, positive_int
from fastload.cli.output import EXIT_OK, emit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model name or adapter directory")
    parser.add_argument("--prompt", type=message, action="append", required=True,
                        help="the user's message (repeat for a batch)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128, help="tokens to generate (default 128)")
    parser.add_argument("--temperature", type=non_negative_float, default=0.0,
                        help="0: greedy (default); above 0: sampling")
    parser.add_argument("--seq", type=positive_int, default=None, help="max_seq_length (default: the model's)")


def run(args: argparse.Namespace) -> int:
    from fastload.facade import FastModel

    model, tokenizer = FastModel.from_pretrained(args.model, lora=None, gradient_checkpointing=False,
                                                 max_seq_length=args.seq)
    kwargs = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {}
    texts = FastModel.generate(model, tokenizer, list(args.prompt), max_new_tokens=args.max_new_tokens, **kwargs)
    data = [{"prompt": p, "text": t} for p, t in zip(args.prompt, texts)]
    emit(args, data if len(data) > 1 else data[0], "\n---\n".join(texts))
    return EXIT_OK
