"""Reads a checkpoint directory without loading it: its config, its weight files, and whether they are whole."""

from __future__ import annotations

import contextlib
import contextvars
import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fastload.errors import CheckpointCorrupt, CheckpointIncomplete, UnsafeCheckpoint

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
# headers already read and checked by the load running on this thread (file, size, mtime) -> header
_headers_of_this_load: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fastload_headers", default=None)


@contextlib.contextmanager
def headers_read_once() -> Iterator[None]:
    """Within the block, each safetensors header is read and checked once however many checks ask for it (a
    load's checks and its reader each did). Only for one load: a file changed later is read again."""
    token = _headers_of_this_load.set({})
    try:
        yield
    finally:
        _headers_of_this_load.reset(token)


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    config: dict
    weight_files: tuple[Path, ...]
    safetensors: bool

    @property
    def bnb_quantized(self) -> bool:
        q = self.config.get("quantization_config") or {}
        return str(q.get("quant_method", "")).lower() == "bitsandbytes"

    @property
    def weight_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)


def read_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointIncomplete(f"Loading the checkpoint in {path}", found="no config.json in that directory",
                                   fix="point at a directory saved by save_pretrained (config.json + *.safetensors)")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointCorrupt(f"Reading {cfg_file}", found=f"it is not valid JSON ({e})",
                                fix="restore config.json from the original checkpoint") from e
    if not isinstance(config, dict) or not isinstance(config.get("model_type", ""), str):
        raise CheckpointCorrupt(f"Reading {cfg_file}", found="it is not a transformers config (no model_type object)",
                                fix="restore config.json from the original checkpoint")
    for section in (config, config.get("text_config")):
        bad = _bad_size_field(section) if isinstance(section, dict) else None
        if bad:
            raise CheckpointCorrupt(f"Reading {cfg_file}", found=f"{bad[0]}={bad[1]!r} is not a positive integer",
                                    fix="restore config.json from the original checkpoint")
        bad = _bad_structure(section) if isinstance(section, dict) else None
        if bad:
            raise CheckpointCorrupt(f"Reading {cfg_file}", found=bad,
                                    fix="restore config.json from the original checkpoint")
    return config


# fields fastload and transformers read as objects or as torch dtype names: any other value fails deep inside them
OBJECT_FIELDS = ("quantization_config", "text_config", "rope_scaling", "rope_parameters")
DTYPE_FIELDS = ("torch_dtype", "dtype")
TORCH_DTYPES = {"auto", "float16", "bfloat16", "float32", "float64", "float", "half", "double", "float8_e4m3fn",
                "float8_e5m2", "int8", "uint8", "int16", "int32", "int64", "bool"}


def _bad_structure(config: dict) -> str | None:
    for key in OBJECT_FIELDS:
        if config.get(key) is not None and not isinstance(config[key], dict):
            return f"{key}={config[key]!r} is not an object"
    for key in DTYPE_FIELDS:
        value = config.get(key)
        if value is not None and (not isinstance(value, str) or value.replace("torch.", "") not in TORCH_DTYPES):
            return f"{key}={value!r} is not a torch dtype name"
    return None


# config fields that size tensors: a wrong type or sign here fails deep inside torch, so it is refused up front
SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "max_position_embeddings", "head_dim")


def _bad_size_field(config: dict) -> tuple[str, object] | None:
    for key in SIZE_FIELDS:
        value = config.get(key)
        values = value if isinstance(value, list) and key == "intermediate_size" else [value]
        if value is not None and not all(_is_count(v) and v > 0 for v in values):
            return key, value
    return None


LAYER_NAME = re.compile(r"^(.*?)(?<![^.])layers\.(\d+)\.")


def check_layer_count(path: Path, config: dict, tensor_names) -> None:
    """Refuse a config that asks for more decoder layers than the weights hold, before memory is spent on them.

    config.json's count is not always the number of stored layers: LongCat-Flash's num_hidden_layers is twice its
    num_layers (two sublayers a layer), Dory's counts attention and MLP sublayers, HRM's counts recurrent
    applications of two small stacks. Where config.json's count exceeds the stored layers, the model transformers
    builds from it (on the meta device, no memory) says how many it holds; only more than the weights is refused."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    asked = {key: text.get(key, config.get(key)) for key in ("num_hidden_layers", "num_layers")}
    key, wanted = min(((k, v) for k, v in asked.items() if isinstance(v, int)), key=lambda kv: kv[1],
                      default=("num_hidden_layers", None))
    held = layers_held(tensor_names)
    if isinstance(wanted, int) and held and wanted > held and _layers_built(config) > held:
        raise CheckpointIncomplete(f"Loading the checkpoint in {path}",
                                   found=f"config.json says {key}={wanted}, the weights hold {held} layers",
                                   fix="use the config.json that belongs to these weights, or finish the download")


def layers_held(names) -> int:
    """The most layers any `...layers.N.` list among these tensor names holds (0 when none)."""
    counts: dict[str, int] = {}
    for name in names:
        m = LAYER_NAME.match(name)
        if m:
            counts[m.group(1)] = max(counts.get(m.group(1), 0), int(m.group(2)) + 1)
    return max(counts.values(), default=0)


def _layers_built(config: dict) -> float:
    """The most layers of any list in the model transformers builds from this config.json, on the meta device; infinity
    where it cannot build it (an unknown model_type, remote code), so config.json's own count stands."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        options = {k: v for k, v in config.items() if k != "quantization_config"}
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**options))
        return layers_held(name for name, _ in model.named_parameters()) or float("inf")
    except Exception:
        return float("inf")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "tekken.json")


def check_tokenizer_files(path: Path) -> None:
    """A local checkpoint needs its tokenizer; say so before minutes of quantization, not after."""
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointIncomplete(f"Loading the tokenizer from {path}",
                                   found=f"no tokenizer files (none of {', '.join(TOKENIZER_FILES[:4])}, ...)",
                                   fix="copy the tokenizer files of the original model next to config.json "
                                       "(tokenizer.save_pretrained(path))")


# bits per element of each safetensors dtype; a name not listed (a newer format) skips only the size check
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
              "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4,
              "F6_E2M3": 6, "F6_E3M2": 6}
DTYPE_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,15}$")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tensors(header: dict, data_bytes: int) -> None:
    """The safetensors format's own rules: known dtype, byte size = shape x dtype, data contiguous and whole."""
    spans = []
    for name, meta in header.items():
        if name == "__metadata__":
            if meta is not None and not isinstance(meta, dict):
                raise ValueError("__metadata__ is not an object")
            continue
        if not isinstance(meta, dict):
            raise ValueError(f"tensor {name!r} is not described by an object")
        offsets, shape, dtype = meta.get("data_offsets"), meta.get("shape"), meta.get("dtype")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise ValueError(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise ValueError(f"tensor {name!r} has invalid shape {shape!r}")
        if not isinstance(dtype, str) or not DTYPE_NAME.match(dtype):
            raise ValueError(f"tensor {name!r} has invalid dtype {dtype!r}")
        if dtype in DTYPE_BITS:
            numel = 1
            for d in shape:
                numel *= d
            if numel * DTYPE_BITS[dtype] != (offsets[1] - offsets[0]) * 8:
                raise ValueError(f"tensor {name!r} is {dtype} {shape} but spans {offsets[1] - offsets[0]} bytes")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise ValueError(f"tensor {name!r} starts at byte {begin}, expected {end} (overlapping or gap)")
        end = stop
    if end != data_bytes:
        what = "truncated?" if end > data_bytes else "trailing bytes"
        raise ValueError(f"header describes {end} bytes of tensor data, the file holds {data_bytes} ({what})")


def read_safetensors_header(file: Path) -> dict:
    """Parse a safetensors header and check it as safetensors itself would, before any weight is read.

    The result is shared within headers_read_once(): callers read it, never change it."""
    memo = _headers_of_this_load.get()
    if memo is None:
        return _read_safetensors_header(file)
    stat = Path(file).stat()
    key = (str(Path(file).resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in memo:
        memo[key] = _read_safetensors_header(Path(file))
    return memo[key]


def _read_safetensors_header(file: Path) -> dict:
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError(f"file has {len(prefix)} bytes, too short for a header")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or n + 8 > size:
                raise ValueError(f"header length {n} does not fit in a file of {size} bytes")
            header = json.loads(f.read(n).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        _check_tensors(header, size - 8 - n)
        return header
    except (ValueError, UnicodeDecodeError, struct.error, OverflowError, TypeError, RecursionError) as e:
        raise CheckpointCorrupt(f"Reading weights from {file}", found=f"not a valid safetensors file: {e}",
                                fix="download or save the checkpoint again; "
                                    "the file is damaged or was cut short") from e


def is_plain_file_name(name) -> bool:
    """A bare file name (no folder part, not absolute, not '..'): what a checkpoint's own files are called."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name \
        and "\0" not in name


def find_weight_files(path: Path, allow_pickle: bool) -> tuple[tuple[Path, ...], bool]:
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted({path / s for s in weight_map.values()})
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointCorrupt(f"Reading {index}", found=f"not a valid shard index ({type(e).__name__}: {e})",
                                    fix="restore the index file from the original checkpoint") from e
        outside = sorted({s for s in weight_map.values() if not is_plain_file_name(s)})
        if outside:  # an index naming ../x or /x would make the load read a file outside the checkpoint
            raise CheckpointCorrupt(f"Reading {index}", found=f"shard names that leave the checkpoint folder: "
                                    f"{outside[:3]}", fix="restore the index file from the original checkpoint")
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise CheckpointIncomplete(f"Loading the sharded checkpoint in {path}",
                                       found=f"{len(missing)} shard(s) named in the index are missing: {missing[:3]}",
                                       fix="finish the download (huggingface-cli download) or copy the missing shards")
        return tuple(shards), True
    single = sorted(path.glob("*.safetensors"))
    if single:
        return tuple(single), True
    pickled = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        if not allow_pickle:
            raise UnsafeCheckpoint(f"Loading the checkpoint in {path}",
                                   found=f"only pickle weight files ({pickled[0].name}); "
                                         "unpickling can run arbitrary code",
                                   fix="convert it to safetensors, or pass allow_pickle=True if you trust its origin")
        return tuple(pickled), False
    raise CheckpointIncomplete(f"Loading the checkpoint in {path}",
                               found="config.json but no weight files (*.safetensors)",
                               fix="copy the weight files next to config.json, or point at the right directory")


def inspect_checkpoint(path: Path, allow_pickle: bool = False, check_weights: bool = True) -> CheckpointInfo:
    """Validate a local checkpoint directory cheaply (headers only) before anything heavy happens."""
    config = read_config(path)
    files, safe = find_weight_files(path, allow_pickle)
    if check_weights and safe:
        names = [name for f in files for name in read_safetensors_header(f) if name != "__metadata__"]
        check_layer_count(path, config, names)
    return CheckpointInfo(path=path, config=config, weight_files=files, safetensors=safe)
