"""GRPO on the real SmolLM2: a rule-based reward rises within eight steps; generation runs with checkpointing
off and the KV cache on, the update with checkpointing on; the optimizer is fastload's 8-bit AdamW."""

from __future__ import annotations

import pytest

from fastload import FastModel
from fastload.errors import InvalidOption
from fastload.train.checkpointing import is_checkpointing
from fastload.train.methods import grpo
from tiny import make_checkpoint

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


def even_token_share(prompts, completions, completion_ids, **kwargs):
    """A rule a random model can learn: the share of even token ids in the completion (about 0.5 at the start)."""
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def grpo_on_tiny(tmp_path, steps: int):
    # initializer_range 0.2: a random model whose logits are far from uniform, so LoRA moves them within a few steps
    checkpoint = make_checkpoint(tmp_path / "peaked", "llama", initializer_range=0.2)
    model, tok = FastModel.from_pretrained(checkpoint, max_seq_length=64, store=False)
    trainer = grpo.build(model, tok, ["fastload loads", "hello world"] * 64, reward_funcs=even_token_share,
                         output_dir=tmp_path / "run", max_steps=steps, learning_rate=1e-2, num_generations=16,
                         per_device_train_batch_size=16, max_completion_length=8, temperature=1.0,
                         save_strategy="no", seed=0)
    return model, trainer


@pytest.mark.gpu
def test_grpo_on_the_gpu_raises_the_reward_with_a_4bit_model(tmp_path):
    """The default load (NF4, bf16 compute) on the device: generation with the KV cache, the update in bf16 with
    fastload's 8-bit AdamW, and the reward rises (tiny Llama: SmolLM2 is not on the device)."""
    import torch

    model, trainer = grpo_on_tiny(tmp_path, steps=24)
    assert next(model.parameters()).device.type == "cuda"
    assert trainer.args.bf16 == torch.cuda.is_bf16_supported()
    assert type(trainer.optimizer).__name__ == "AdamW8bitNoSync"
    trainer.train()
    rewards = rewards_of(trainer)
    assert sum(rewards[-6:]) / 6 > sum(rewards[:6]) / 6 + 0.15, rewards
    assert is_checkpointing(model) and model.get_base_model().config.use_cache is False
