"""Seeded fuzzing of what a checkpoint directory holds: safetensors headers and config.json, mutated at random.

Every mutated checkpoint must end in a fastload error or a correct load: never another exception type, never a hang,
never a model whose weights differ from what the file holds or whose layers have other shapes than the file's tensors.
A failure names its kind and seed, so `mutate(kind, seed)` rebuilds the exact input.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
from collections import Counter
from pathlib import Path

import pytest

from fastload import FastModel
from fastload.errors import FastloadError
from fastload.sources.checkpoint_files import inspect_checkpoint
from helpers_faults import WEIGHTS, pack_safetensors, read_safetensors
from tiny import make_checkpoint

SECONDS_PER_CASE = 15
TALLY: Counter = Counter()


class Hang(BaseException):
    """Raised by the alarm: a BaseException, so no `except Exception` in the code under test can swallow it."""


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """Smaller than tiny_llama (hidden 64): a mutated load costs a few milliseconds."""
    return make_checkpoint(tmp_path_factory.mktemp("fuzz") / "small", "llama", hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                           max_position_embeddings=128)


# -- mutations ----------------------------------------------------------------------------------------------------

ODD_VALUES = [-1, 0, 1, 3, 2 ** 31, 2 ** 63, 2 ** 70, -2 ** 40, 1.5, float("nan"), "7", "", None, True, [], {}, [1, 2],
              {"a": 1}, "A" * 300]
DTYPES = ["F16", "BF16", "F32", "F64", "I8", "U8", "I64", "BOOL", "F8_E4M3", "Q4", "bf16", "", "F32 ", 16]


def _tensors(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def mutate_header(raw: bytes, rng: random.Random) -> bytes:
    """One random change to a safetensors file: structured (fields of the JSON header) or raw bytes."""
    header, data = read_safetensors_bytes(raw)
    names = _tensors(header)
    name = rng.choice(names)
    meta = header[name]
    op = rng.randrange(14)
    if op == 0:  # a byte of the header flipped
        n = int.from_bytes(raw[:8], "little")
        out = bytearray(raw)
        out[8 + rng.randrange(n)] ^= 1 << rng.randrange(8)
        return bytes(out)
    if op == 1:  # the header length prefix
        n = int.from_bytes(raw[:8], "little")
        length = rng.choice([0, 1, n - 1, n + 1, n + 8, len(raw), 2 ** 63, rng.randrange(2 ** 32)])
        return length.to_bytes(8, "little") + raw[8:]
    if op == 2:  # cut short anywhere
        return raw[:rng.randrange(len(raw))]
    if op == 3:  # bytes appended
        return raw + bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 8, 64, 4096])))
    if op == 4:
        meta["dtype"] = rng.choice(DTYPES)
    elif op == 5:
        shape = list(meta["shape"])
        if shape:
            i = rng.randrange(len(shape))
            shape[i] = rng.choice([shape[i] + 1, shape[i] - 1, shape[i] * 2, shape[i] // 2, 0, *ODD_VALUES])
        meta["shape"] = rng.choice([shape, shape[::-1], shape + [1], shape[:-1], rng.choice(ODD_VALUES)])
    elif op == 6:
        begin, end = meta["data_offsets"]
        meta["data_offsets"] = rng.choice([[begin + 2, end + 2], [end, begin], [begin], [begin, end, end],
                                           [-begin, end], [begin, 2 ** 64], [begin, end - 2], rng.choice(ODD_VALUES)])
    elif op == 7:  # two tensors exchange their bytes (shapes kept): a valid file holding other weights
        other = header[rng.choice(names)]
        meta["data_offsets"], other["data_offsets"] = other["data_offsets"], meta["data_offsets"]
    elif op == 8:
        del header[name]
    elif op == 9:  # renamed: the model lacks the weight, or gets one it does not have
        header[name.replace("weight", rng.choice(["bias", "weight_", "Weight"]))] = header.pop(name)
    elif op == 10:
        header[rng.choice(["extra.weight", "model.layers.7.mlp.up_proj.weight", "model.norm.weight"])] = dict(meta)
    elif op == 11:
        header["__metadata__"] = rng.choice([{"format": "pt"}, {"format": 1}, [], "pt", None, {"a": {"b": 1}}])
    elif op == 12:
        header[name] = rng.choice(ODD_VALUES)
    else:  # a field removed or added
        key = rng.choice(["dtype", "shape", "data_offsets"])
        if rng.random() < 0.5:
            meta.pop(key)
        else:
            meta["extra"] = rng.choice(ODD_VALUES)
    return pack_safetensors_any(header, data)


def read_safetensors_bytes(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def pack_safetensors_any(header, data: bytes) -> bytes:
    try:
        return pack_safetensors(header, data)
    except ValueError:  # NaN and the like: written as Python's json would (not strict JSON)
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        return len(blob).to_bytes(8, "little") + blob + data


CONFIG_KEYS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
               "model_type", "architectures", "tie_word_embeddings", "hidden_act", "torch_dtype", "dtype",
               "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias", "mlp_bias", "attention_dropout",
               "quantization_config", "text_config", "auto_map", "initializer_range"]


def mutate_config(text: str, rng: random.Random) -> str:
    """One random change to config.json: a field's value, type or presence, or the JSON text itself."""
    op = rng.randrange(10)
    if op == 0:
        cut = rng.randrange(len(text))
        return text[:cut]
    if op == 1:
        i = rng.randrange(len(text))
        return text[:i] + rng.choice(['"', "}", "{", ",", "\x00", "\\", "ÿ", " "]) + text[i + 1:]
    config = json.loads(text)
    key = rng.choice(CONFIG_KEYS)
    if op == 2:
        config.pop(key, None)
    elif op in (3, 4) and isinstance(config.get(key), int) and not isinstance(config.get(key), bool):
        config[key] = config[key] + rng.choice([-1, 1, config[key], -config[key]])
    elif op == 5:
        config[key] = rng.choice([{"rope_type": "linear", "factor": 2.0}, {"type": "bogus"}, {"rope_type": "yarn"},
                                  {"quant_method": "bitsandbytes"}, {"quant_method": "gptq", "bits": 4},
                                  {"model_type": "llama"}, {"AutoModelForCausalLM": "x.Y"}])
    elif op == 6:
        config[key] = rng.choice(["llama", "mistral", "gpt2", "bert", "no_such_type", "gelu", "silu", "float16",
                                  "int4", ["LlamaForCausalLM"], ["Nothing"]])
    else:
        config[key] = rng.choice(ODD_VALUES)
    try:
        return json.dumps(config)
    except ValueError:
        return json.dumps(config, allow_nan=True)


# -- the oracle -------------------------------------------------------------------------------------------------

def _alarm(signum, frame):
    raise Hang(f"no answer within {SECONDS_PER_CASE} s")


def outcome(model_dir: Path) -> str:
    """'refused' (a fastload error) or 'loaded' (checked correct); anything else raises and fails the test."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS_PER_CASE)
    try:
        try:
            inspect_checkpoint(model_dir)
            for bits16 in (True, False):
                model, _ = FastModel.from_pretrained(model_dir, lora=None, store=False, load_in_4bit=not bits16,
                                                     gradient_checkpointing=False, engine=False)
                check_matches_file(model, model_dir, bits16)
        except FastloadError:
            return "refused"
        return "loaded"
    finally:
        signal.alarm(0)


def check_matches_file(model, model_dir: Path, bits16: bool) -> None:
    """The loaded model is what the files say: every weight from the file, equal (16-bit) or of its shape (4-bit)."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(model_dir / WEIGHTS)  # safetensors' own reader must accept what fastload accepted
    params = dict(model.named_parameters())
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, p in params.items():
        if name not in saved:
            assert tied and name == "lm_head.weight", f"{name} loaded without being in the file"
            continue
        if bits16:
            assert torch.equal(p.data, saved[name].to(p.dtype)), f"{name} differs from the file"
        else:
            shape = getattr(getattr(p, "quant_state", None), "shape", p.shape)
            assert tuple(shape) == tuple(saved[name].shape), \
                f"{name} has shape {tuple(shape)}, the file {saved[name].shape}"
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert out.shape[-1] == model.config.vocab_size


def run_fuzz(small: Path, tmp_path: Path, kind: str, seeds: range, failures: list[str]) -> Counter:
    results: Counter = Counter()
    work = tmp_path / "case"
    for seed in seeds:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(small, work)
        rng = random.Random(f"{kind}-{seed}")
        if kind == "header":
            (work / WEIGHTS).write_bytes(mutate_header((small / WEIGHTS).read_bytes(), rng))
        else:
            (work / "config.json").write_text(mutate_config((small / "config.json").read_text(), rng))
        try:
            results[outcome(work)] += 1
        except (Exception, Hang) as e:  # collected, so one run shows every failing seed
            results["failed"] += 1
            failures.append(f"{kind} seed {seed}: {type(e).__name__}: {str(e)[:300]}")
    return results


# -- the tests --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,count", [("header", 100), ("config", 100)])
def test_mutated_checkpoints_load_correctly_or_fail_clearly(small, tmp_path, kind, count):
    failures: list[str] = []
    results = run_fuzz(small, tmp_path, kind, range(count), failures)
    assert not failures, (f"{len(failures)} of {count} inputs neither loaded correctly nor failed clearly:\n"
                          + "\n".join(failures))
    TALLY.update({f"{kind} {k}": v for k, v in results.items()})
    assert sum(results.values()) == count
    assert results["refused"] > count // 4  # the mutations do reach the checks (a fuzzer that never hits is no test)
    print(f"\nfuzz {kind}: {count} inputs, {results['refused']} refused with a fastload error, "
          f"{results['loaded']} loaded and checked against the file")


def test_unmutated_copy_loads_and_matches(small, tmp_path):
    """The oracle itself: an intact copy loads, in 16 and 4 bits, and matches its file."""
    shutil.copytree(small, tmp_path / "intact")
    assert outcome(tmp_path / "intact") == "loaded"


def test_mutations_are_reproducible(small):
    raw = (small / WEIGHTS).read_bytes()
    assert mutate_header(raw, random.Random("header-3")) == mutate_header(raw, random.Random("header-3"))
    header, _ = read_safetensors(small / WEIGHTS)
    assert len(_tensors(header)) > 10
