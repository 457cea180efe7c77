"""Generation from the trained model: chat-templated prompts, left-padded batches, only the new text back.

Decoder-only models continue from the last position of each row, so a batch must be padded on the left; the
tokenizer fastload returns pads on the right (what training wants). `left_padding(tokenizer)` switches it for a
block; `generate` does it for you.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from fastload.errors import InvalidOption
from fastload.train.checkpointing import for_inference, for_training


@contextlib.contextmanager
def left_padding(tokenizer) -> Iterator[Any]:
    """Pad on the left inside the block, as before after it."""
    before = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = before


def prompt_text(tokenizer, prompt) -> tuple[str, bool]:
    """(text to tokenize, whether the chat template was applied): a string becomes one user turn when the tokenizer
    has a chat template; a list of messages is templated as is, with the assistant's turn opened."""
    from fastload.data import render

    if isinstance(prompt, str):
        if not getattr(tokenizer, "chat_template", None):
            return prompt, False
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        return render(tokenizer, prompt, add_generation_prompt=True), True
    raise InvalidOption("Generating from a prompt", found=f"a {type(prompt).__name__}",
                        fix="pass a string, a list of {'role', 'content'} messages, or a list of those")


def generate(model, tokenizer, prompts, max_new_tokens: int = 128, **kwargs: Any):
    """Generate for one prompt (returns a string) or a list of prompts (returns a list), greedy unless told otherwise.

    The model goes to generation mode for the call (checkpointing off, KV cache on) and back to training mode
    afterwards if it was training. kwargs go to model.generate (do_sample=True, temperature=..., ...).
    """

    single = isinstance(prompts, str) or (isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], dict))
    items = [prompts] if single else list(prompts)
    if not items:
        return []
    rendered = [prompt_text(tokenizer, p) for p in items]
    templated = {t for _, t in rendered}
    with left_padding(tokenizer):
        # a chat template writes BOS itself; raw text gets the tokenizer's special tokens
        batch = tokenizer([text for text, _ in rendered], return_tensors="pt", padding=True,
                          add_special_tokens=templated != {True})
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    was_training = model.training
    for_inference(model)
    kwargs.setdefault("do_sample", False)
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    try:
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, **kwargs)
    finally:
        if was_training:
            for_training(model)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return texts[0] if single else texts
