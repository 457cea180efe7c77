"""Tiny real checkpoints built in-process: Llama/Qwen2/Mistral/Gemma/Phi-3 shapes, real safetensors, a real
tokenizer."""

from __future__ import annotations

from pathlib import Path

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine",
          "fastload loads models for QLoRA fine-tuning", "hello world, how are you today?",
          "user assistant system tool 0123456789 !?.,;:'\"()[]{}<>/-_+=*&^%$#@~`|\\"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# hidden 256 and r=16 make LoRA matrices of 4096 elements: bitsandbytes keeps 8-bit optimizer state from that size on
SHAPES = {
    "llama": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512),
    "qwen2": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512),
    "mistral": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512),
    "gemma": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=64, max_position_embeddings=512),
    "qwen3": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=128, max_position_embeddings=512),
    # Gemma-2/3 scale attention by query_pre_attn_scalar (256 by default), llama.cpp by head_dim: real 2B/9B sizes
    "gemma2": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=256, max_position_embeddings=512, sliding_window=64),
    "gemma3_text": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=256, max_position_embeddings=512, sliding_window=64),
    "phi3": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0),
}
EXPECTED_TARGETS = {
    "llama": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "qwen2": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "mistral": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "gemma": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "phi3": ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],
}


def make_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                   unk_token="<|endoftext|>", pad_token="<|pad|>")
    fast.chat_template = CHATML
    return fast


def make_checkpoint(directory: Path, family: str = "llama", dtype: str = "bfloat16", seed: int = 0,
                                    tokenizer=True, **overrides) -> Path:
    """Save a randomly initialised model of the family's shape as a real safetensors checkpoint (tokenizer: True for
    the byte-level BPE one, False for none, or a tokenizer object to save)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    tok = tokenizer if not isinstance(tokenizer, bool) else make_tokenizer()
    config = AutoConfig.for_model(family, vocab_size=len(tok), **{**SHAPES[family], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(directory)
    if tokenizer is not False:
        tok.save_pretrained(directory)
    return directory


def nonzero_lora_b(model, seed: int = 0) -> None:
    """peft starts B at zero, which leaves A without a gradient; give B the same random values in every model."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def train_steps(model, batch, steps: int = 3, lr: float = 1e-3) -> list[float]:
    """`steps` optimizer steps on `batch` (its input ids as labels) with fastload's default optimizer; the losses."""
    from fastload import FastModel

    optimizer = FastModel.get_optimizer(model, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def make_sentencepiece_style_tokenizer(vocab_size: int = 384):
    """A Llama-2-style tokenizer.json: BPE with byte fallback, '▁' for spaces, <0xXX> byte pieces in the vocab."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=vocab_size - len(specials),
                                                                show_progress=False))
    learned = sorted(trained.get_vocab().items(), key=lambda kv: kv[1])
    vocab = {t: i for i, t in enumerate(specials + [t for t, _ in learned])}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in __import__("json").loads(trained.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = trained.normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHATML
    return fast
