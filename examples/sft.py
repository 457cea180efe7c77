"""Fine-tune SmolLM2-135M-Instruct on CPU in a few minutes: QLoRA on a small chat dataset, responses-only.

Run:  python examples/sft.py [--steps 40] [--data examples/data/chat_sample.jsonl] [--out outputs/smollm2-answer-card]

The sample data teaches one visible habit: every reply is a two-line card, "Answer: ..." then "Reason: ...".
The script holds out the last records, prints their loss before and after training (it should drop clearly),
answers the held-out questions before and after, and checks what the fine-tune teaches: after training every
held-out reply is such a card (before, the model answers in free prose). If not, it prints FAIL and exits 1.
It then saves the LoRA adapter. Load it again with FastModel.from_pretrained(<out>) to keep training or to generate.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path

from fastload import FastModel
from fastload.data import Collator, load_records, prepare_records

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_DATA = Path(__file__).parent / "data" / "chat_sample.jsonl"
CARD = re.compile(r"Answer: (?P<answer>[^\n]+)\nReason: \S")  # the two-line reply the sample data teaches
SHOWN = 2  # held-out questions printed in full; the check covers all of them


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


def show_replies(model, tokenizer, questions: list[str], when: str, max_new_tokens: int) -> list[str]:
    """Answer every held-out question (greedy, one batch) and print the first few in full."""
    replies = [r.strip() for r in FastModel.generate(model, tokenizer, questions, max_new_tokens=max_new_tokens)]
    for question, reply in zip(questions[:SHOWN], replies):
        print(f"\nQ: {question}\n{when}:\n{reply}")
    print()
    return replies


def check_cards(before: list[str], after: list[str], heldout: list[dict]) -> bool:
    """The check the showcase stands on: after training every held-out reply is an Answer/Reason card.

    Also counts replies whose Answer line starts with the reference answer, as a hint of what a 135M model gets
    right; that count is printed, not required (a small model learns the format before the arithmetic).
    """
    references = [CARD.match(r["messages"][1]["content"]).group("answer") for r in heldout if "messages" in r]

    def cards(replies):
        return sum(bool(CARD.match(reply)) for reply in replies)

    def right(replies):
        return sum(bool((m := CARD.match(reply)) and m.group("answer").startswith(ref.rstrip(".")))
                   for reply, ref in zip(replies, references))

    print(f"Answer/Reason cards among {len(after)} held-out replies: before {cards(before)} -> after {cards(after)}"
          f"; answer as in the data: before {right(before)} -> after {right(after)}")
    if cards(after) == len(after) and cards(before) < len(before):
        print("PASS: the fine-tune taught the card format")
        return True
    print("FAIL: the fine-tune did not teach the card format (see the replies above)")
    return False


def split_records(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """The training records and the held-out ones (the last --heldout records of --data)."""
    records = load_records(args.data)
    if len(records) <= args.heldout:
        raise SystemExit(f"{args.data} has {len(records)} records: need more than --heldout={args.heldout}")
    return records[:-args.heldout], records[-args.heldout:]


def load_model(args: argparse.Namespace):
    """The 4-bit model with LoRA, as fastload prepares it for training, and its tokenizer."""
    # A 135M model's activations are small: without gradient checkpointing each step skips recomputing the
    # forward pass (about a quarter of a CPU step). Leave it on (the default) for bigger models or longer texts.
    return FastModel.from_pretrained(args.model, max_seq_length=args.max_seq_length, gradient_checkpointing=False)


def train(model, tokenizer, records: list[dict], args: argparse.Namespace):
    """The fine-tune itself: --steps optimizer steps on the records. Tests run this same function (fewer steps)."""
    training_args = FastModel.training_arguments(
        args.out.with_name(args.out.name + "-trainer"), model=model, max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=args.learning_rate, warmup_steps=0,
        lr_scheduler_type="cosine", logging_steps=1, save_strategy="no", disable_tqdm=True)
    # Raw records go in as they are: get_trainer chat-templates them and scores only the assistant's tokens,
    # with bitsandbytes' 8-bit AdamW as the optimizer (stepped by fastload: fastload/adamw8bit.py).
    trainer = FastModel.get_trainer(model, tokenizer, records, args=training_args)
    trainer.train()
    return trainer


def describe_optimizer(trainer) -> str:
    """e.g. "bitsandbytes.AdamW8bit (8-bit state, fastload's lean step)": what actually stepped the weights."""
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate may wrap it
    bits = getattr(getattr(optimizer, "args", None), "optim_bits", None)  # bitsandbytes keeps it there
    kind = next((c for c in type(optimizer).__mro__ if c.__module__.startswith("bitsandbytes")), type(optimizer))
    notes = ([f"{bits}-bit state"] if bits else []) + (["fastload's lean step"] if kind is not type(optimizer) else [])
    return f"{kind.__module__.split('.')[0]}.{kind.__name__}" + (f" ({', '.join(notes)})" if notes else "")


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    train_records, heldout = split_records(args)
    print(f"data: {len(train_records)} training records, {len(heldout)} held out ({args.data})")

    model, tokenizer = load_model(args)
    questions = [r["messages"][0]["content"] for r in heldout if "messages" in r]

    before = answer_loss(model, tokenizer, heldout, args.max_seq_length)
    print(f"held-out loss before: {before:.3f}")
    replies_before = show_replies(model, tokenizer, questions, "before training", args.max_new_tokens)

    trained = time.perf_counter()
    trainer = train(model, tokenizer, train_records, args)
    print(f"training: {args.steps} steps in {time.perf_counter() - trained:.0f} s, optimizer "
          f"{describe_optimizer(trainer)}")

    after = answer_loss(model, tokenizer, heldout, args.max_seq_length)
    print(f"held-out loss after: {after:.3f}")
    print(f"held-out loss: before {before:.3f} -> after {after:.3f} (perplexity {math.exp(before):.1f} -> "
          f"{math.exp(after):.1f})")
    replies_after = show_replies(model, tokenizer, questions, "after training", args.max_new_tokens)
    learnt = check_cards(replies_before, replies_after, heldout) if questions else True

    saved = FastModel.save_adapter(model, args.out, tokenizer=tokenizer)
    print(f"adapter saved to {saved} in {time.perf_counter() - started:.0f} s total")
    if not learnt:
        sys.exit(1)


if __name__ == "__main__":
    main()
