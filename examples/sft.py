"""Fine-tune SmolLM2-135M-Instruct on CPU in a few minutes: QLoRA on a small chat dataset, responses-only.

Run:  python examples/sft.py [--steps 40] [--data examples/data/chat_sample.jsonl] [--out outputs/smollm2-answer-card]

The sample data teaches one visible habit: every reply is a two-line card, "Answer: ..." then "Reason: ...".
The script holds out the last records, prints their loss before and after training (it should drop clearly),
shows one held-out question answered before and after, and saves the LoRA adapter. Load the adapter again with
FastModel.from_pretrained(<out>) to keep training or to generate.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from fastload import FastModel
from fastload.data import Collator, load_records, prepare_records

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_DATA = Path(__file__).parent / "data" / "chat_sample.jsonl"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="hub id, registry alias, folder or .gguf file")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=".jsonl/.json/.csv records: messages, ShareGPT, Alpaca or prompt/response")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (about 1.5 s each on a 2-core CPU)")
    parser.add_argument("--max-seq-length", type=int, default=256, help="longer conversations are cut")
    parser.add_argument("--out", type=Path, default=Path("outputs") / "smollm2-answer-card",
                        help="where the LoRA adapter is saved")
    parser.add_argument("--heldout", type=int, default=8, help="records kept out of training to measure the loss")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=2e-3,
                        help="10x the usual 2e-4: a 135M model and only a few steps")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    if args.steps <= 0 or args.heldout <= 0 or args.batch_size <= 0:
        parser.error("--steps, --heldout and --batch-size must be positive")
    return args


def answer_loss(model, tokenizer, records, max_seq_length: int, batch_size: int = 8) -> float:
    """Mean loss per answer token over the records (prompts are not scored), in eval mode, without gradients.

    This is what "the model learned the task" means: how surprised it is by answers it never trained on.
    """
    import torch

    examples = prepare_records(records, tokenizer, max_seq_length)
    collate = Collator(tokenizer)
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i:i + batch_size])
            scored = int((batch["labels"][:, 1:] != -100).sum())  # the model shifts labels by one
            total += model(**batch).loss.item() * scored
            tokens += scored
    model.train(was_training)
    return total / tokens


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    records = load_records(args.data)
    if len(records) <= args.heldout:
        raise SystemExit(f"{args.data} has {len(records)} records: need more than --heldout={args.heldout}")
    train, heldout = records[:-args.heldout], records[-args.heldout:]
    print(f"data: {len(train)} training records, {len(heldout)} held out ({args.data})")

    # A 135M model's activations are small: without gradient checkpointing each step skips recomputing the
    # forward pass (about a quarter of a CPU step). Leave it on (the default) for bigger models or longer texts.
    model, tokenizer = FastModel.from_pretrained(args.model, max_seq_length=args.max_seq_length,
                                                 gradient_checkpointing=False)
    question = heldout[0]["messages"][0]["content"] if "messages" in heldout[0] else None

    before = answer_loss(model, tokenizer, heldout, args.max_seq_length)
    print(f"held-out loss before: {before:.3f}")
    if question:
        answer = FastModel.generate(model, tokenizer, question, max_new_tokens=args.max_new_tokens).strip()
        print(f"\nQ: {question}\nbefore training:\n{answer}\n")

    training_args = FastModel.training_arguments(
        args.out.with_name(args.out.name + "-trainer"), model=model, max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=args.learning_rate, warmup_steps=0,
        lr_scheduler_type="cosine", logging_steps=1, save_strategy="no", disable_tqdm=True)
    # Raw records go in as they are: get_trainer chat-templates them and scores only the assistant's tokens,
    # with bitsandbytes' 8-bit AdamW as the optimizer (stepped by fastload: fastload/adamw8bit.py).
    trainer = FastModel.get_trainer(model, tokenizer, train, args=training_args)
    trained = time.perf_counter()
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate may wrap it
    bits = getattr(getattr(optimizer, "args", None), "optim_bits", None)  # bitsandbytes keeps it there
    kind = next((c for c in type(optimizer).__mro__ if c.__module__.startswith("bitsandbytes")), type(optimizer))
    notes = ([f"{bits}-bit state"] if bits else []) + (["fastload's lean step"] if kind is not type(optimizer) else [])
    print(f"training: {args.steps} steps in {time.perf_counter() - trained:.0f} s, optimizer "
          f"{kind.__module__.split('.')[0]}.{kind.__name__}" + (f" ({', '.join(notes)})" if notes else ""))

    after = answer_loss(model, tokenizer, heldout, args.max_seq_length)
    print(f"held-out loss after: {after:.3f}")
    print(f"held-out loss: before {before:.3f} -> after {after:.3f} (perplexity {math.exp(before):.1f} -> "
          f"{math.exp(after):.1f})")
    if question:
        answer = FastModel.generate(model, tokenizer, question, max_new_tokens=args.max_new_tokens).strip()
        print(f"\nQ: {question}\nafter training:\n{answer}\n")

    saved = FastModel.save_adapter(model, args.out, tokenizer=tokenizer)
    print(f"adapter saved to {saved} in {time.perf_counter() - started:.0f} s total")


if __name__ == "__main__":
    main()
