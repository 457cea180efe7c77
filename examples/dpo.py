"""DPO on SmolLM2-135M-Instruct on the CPU: prefer short, direct answers, in a few steps.

Run:  python examples/dpo.py [--steps 3] [--out outputs/smollm2-dpo]

The pairs below prefer a one-line answer over a rambling or wrong one. DPO trains the LoRA adapter against the
reference, which is the same 4-bit model with the adapter switched off (no second copy in memory). The script prints
the reward margin (how much more the policy prefers the chosen answer than the reference does) per step, which
starts at 0 and should grow, and saves the adapter; FastModel.from_pretrained(<out>) loads it again.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastload import FastModel

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris.",
     "rejected": "France is a country in Europe with many cities, and one of them is its capital, London."},
    {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "Let me think about numbers in general first. 5."},
    {"prompt": "Which colour is a clear daytime sky?", "chosen": "Blue.", "rejected": "Green, mostly."},
    {"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "A hammer is a tool, not a fruit, but still."},
    # conversations work too; the tokenizer's chat template renders them
    {"prompt": [{"role": "user", "content": "How many legs does a cat have?"}],
     "chosen": [{"role": "assistant", "content": "Four."}],
     "rejected": [{"role": "assistant", "content": "Cats are animals. Animals have legs. Three."}]},
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="hub id, registry alias, folder or .gguf file")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO's beta: how far from the reference it may go")
    parser.add_argument("--learning-rate", type=float, default=5e-4,
                        help="high for DPO (usually 5e-6 .. 5e-5): a 135M model and only a few steps")
    parser.add_argument("--out", type=Path, default=Path("outputs") / "smollm2-dpo", help="where the adapter goes")
    args = parser.parse_args(argv)
    if args.steps <= 0:
        parser.error("--steps must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    model, tokenizer = FastModel.from_pretrained(args.model, max_seq_length=64)
    trainer = FastModel.get_trainer(model, tokenizer, PAIRS, method="dpo",
                                    output_dir=str(args.out.with_name(args.out.name + "-trainer")),
                                    max_steps=args.steps, beta=args.beta, learning_rate=args.learning_rate,
                                    per_device_train_batch_size=len(PAIRS), gradient_accumulation_steps=1,
                                    save_strategy="no", logging_steps=1, disable_tqdm=True)
    print(f"optimizer {type(trainer.optimizer).__name__}; reference: "
          f"{'the base with the adapter off' if trainer.ref_model is None else 'a separate model'}")
    trainer.train()
    for entry in trainer.state.log_history:
        if "rewards/margins" in entry:
            print(f"step {entry['step']}: loss {entry['loss']:.4f}, reward margin {entry['rewards/margins']:.4f}, "
                  f"chosen preferred in {entry['rewards/accuracies']:.0%} of pairs")
    FastModel.save_adapter(model, args.out, tokenizer)
    print(f"adapter saved in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
