"""GRPO on SmolLM2-135M-Instruct on the CPU: a rule-based reward (answer "Yes") rises within a dozen steps.

Run:  python examples/grpo.py [--steps 12] [--out outputs/smollm2-grpo-yes]

The model samples 8 two-token answers per question; the reward function scores each 1.0 when the answer starts with
"Yes", else 0.0; GRPO pushes up the answers that beat their group's mean. The script prints the mean reward of each
step, the first and last steps' means, one answer before and after, and saves the LoRA adapter.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastload import FastModel
from fastload.train.methods import grpo

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTIONS = ["Q: Is the sun hot?\nA:", "Q: Is water wet?\nA:"]


def says_yes(prompts, completions, **kwargs):
    """The reward: 1.0 for an answer that starts with "Yes", else 0.0 (any plain function of the texts works)."""
    return [1.0 if c.strip().lower().startswith("yes") else 0.0 for c in completions]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="hub id, registry alias, folder or .gguf file")
    parser.add_argument("--steps", type=int, default=12, help="GRPO steps (8 samples each)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="high: a 135M model and a dozen steps")
    parser.add_argument("--out", type=Path, default=Path("outputs") / "smollm2-grpo-yes")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    import torch

    args = parse_args(argv)
    # 4-bit on a GPU; on the CPU 16-bit is about twice as fast (bitsandbytes dequantizes 4-bit weights every call)
    model, tok = FastModel.from_pretrained(args.model, max_seq_length=64, load_in_4bit=torch.cuda.is_available())
    print("before:", repr(FastModel.generate(model, tok, QUESTIONS[0], max_new_tokens=4)))
    trainer = grpo.build(model, tok, QUESTIONS * 64, reward_funcs=says_yes,
                         output_dir=args.out.with_name(args.out.name + "-trainer"),
                         max_steps=args.steps, learning_rate=args.learning_rate, num_generations=8,
                         per_device_train_batch_size=8, max_completion_length=2, temperature=1.0,
                         save_strategy="no", seed=0)
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    print("mean reward per step:", " ".join(f"{r:.2f}" for r in rewards))
    k = max(1, min(3, len(rewards) // 2))
    print(f"first {k} steps: {sum(rewards[:k]) / k:.3f}  last {k} steps: {sum(rewards[-k:]) / k:.3f}")
    print("after:", repr(FastModel.generate(model, tok, QUESTIONS[0], max_new_tokens=4)))
    FastModel.save_adapter(model, args.out, tokenizer=tok)
    print(f"adapter saved in {args.out}")


if __name__ == "__main__":
    main()
