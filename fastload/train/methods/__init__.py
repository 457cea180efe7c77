"""Trainers beyond SFT, one module per method (grpo, pretrain ...), each with `build(model, tokenizer, data,
args=None, **kwargs) -> trainer`."""
