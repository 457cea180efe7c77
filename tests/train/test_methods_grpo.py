"""GRPO on the real SmolLM2: a rule-based reward rises within eight steps; generation runs with checkpointing
off and the KV cache on, the update with checkpointing on; the optimizer is fastload's 8-bit AdamW."""

from __future__ import annotations

import pytest

from fastload import FastModel
from fastload.errors import InvalidOption
from fastload.train.checkpointing import is_checkpointing
from fastload.train.methods import grpo

# SmolLM2 answers these mostly "No" (about 1 in 8 samples says "Yes" at temperature 1): room for the reward to rise
PROMPTS = ["Q: Is the sun hot?\nA:", "Q: Is water wet?\nA:"] * 64


def says_yes(prompts, completions, **kwargs):
    return [1.0 if c.strip().lower().startswith("yes") else 0.0 for c in completions]


def rewards_of(trainer) -> list[float]:
    return [h["reward"] for h in trainer.state.log_history if "reward" in h]


def test_grpo_raises_a_rule_based_reward_on_smollm2(smollm2_dir, tmp_path):
    # 16-bit on the CPU: bitsandbytes' CPU path dequantizes every 4-bit weight at each call (about twice as slow)
    model, tok = FastModel.from_pretrained(smollm2_dir, max_seq_length=64, load_in_4bit=False)
    seen = []

    def says_yes_and_looks(prompts, completions, **kwargs):
        base = model.get_base_model()
        seen.append((is_checkpointing(model), base.config.use_cache))  # scored inside the generation step
        return says_yes(prompts, completions)

    trainer = grpo.build(model, tok, PROMPTS, reward_funcs=says_yes_and_looks, output_dir=tmp_path, max_steps=8,
                         learning_rate=1e-3, num_generations=8, per_device_train_batch_size=8,
                         max_completion_length=2, temperature=1.0, save_strategy="no", seed=0)
    assert type(trainer.optimizer).__name__ == "AdamW8bitNoSync"
    trainer.train()
    rewards = rewards_of(trainer)
    assert len(rewards) == 8
    first, last = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert last > first + 0.25, rewards
    assert seen and all(state == (False, True) for state in seen)  # generation: checkpointing off, cache on
    assert is_checkpointing(model) and model.get_base_model().config.use_cache is False  # back on for the update


def test_grpo_refuses_a_reward_that_returns_the_wrong_shape(smollm2_dir, tmp_path):
    model, tok = FastModel.from_pretrained(smollm2_dir, max_seq_length=64, load_in_4bit=False)
    with pytest.raises(InvalidOption, match="reward function"):
        grpo.build(model, tok, PROMPTS, reward_funcs=[], output_dir=tmp_path)
    with pytest.raises(InvalidOption, match="module:function"):
        grpo.build(model, tok, PROMPTS, reward_funcs="no_colon_here", output_dir=tmp_path)
    trainer = grpo.build(model, tok, PROMPTS[:8], reward_funcs=lambda prompts, completions, **kw: 1.0,
                         output_dir=tmp_path, max_steps=1, num_generations=4, per_device_train_batch_size=4,
                         max_completion_length=2, save_strategy="no")
    with pytest.raises(InvalidOption, match="one float"):
        trainer.train()


@pytest.mark.gpu
def test_grpo_on_the_gpu_raises_the_reward_with_4bit_smollm2(smollm2_dir, tmp_path):
    """The default load (NF4, bf16 compute) on the device: the reward rises, bf16 mixed precision is on."""
    model, tok = FastModel.from_pretrained(smollm2_dir, max_seq_length=256)
    trainer = grpo.build(model, tok, PROMPTS, reward_funcs=says_yes, output_dir=tmp_path, max_steps=20,
                         learning_rate=5e-4, num_generations=16, per_device_train_batch_size=16,
                         max_completion_length=8, temperature=1.0, save_strategy="no", seed=0)
    assert trainer.args.bf16 and type(trainer.optimizer).__name__ == "AdamW8bitNoSync"
    trainer.train()
    rewards = rewards_of(trainer)
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.25, rewards
    assert is_checkpointing(model)
