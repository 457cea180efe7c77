"""Reads a checkpoint directory without loading it: its config, its weight files, and whether they are whole."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointCorrupt, CheckpointIncomplete, UnsafeCheckpoint

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit


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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointCorrupt(f"Reading {cfg_file}", found=f"it is not valid JSON ({e})",
                                fix="restore config.json from the original checkpoint") from e
    if not isinstance(config, dict) or not isinstance(config.get("model_type", ""), str):
        raise CheckpointCorrupt(f"Reading {cfg_file}", found="it is not a transformers config (no model_type object)",
                                fix="restore config.json from the original checkpoint")
    return config


def read_safetensors_header(file: Path) -> dict:
    """Parse a safetensors header and check the file holds every byte the header promises."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError(f"file has {len(prefix)} bytes, too short for a header")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or n + 8 > size:
                raise ValueError(f"header length {n} does not fit in a file of {size} bytes")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = 0
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(meta, dict) or not isinstance(meta.get("data_offsets"), list) or len(meta["data_offsets"]) != 2:
                raise ValueError(f"tensor {name!r} has no valid data_offsets")
            begin, stop = meta["data_offsets"]
            if not (isinstance(begin, int) and isinstance(stop, int) and 0 <= begin <= stop):
                raise ValueError(f"tensor {name!r} has offsets {meta['data_offsets']}")
            if not isinstance(meta.get("shape"), list) or not isinstance(meta.get("dtype"), str):
                raise ValueError(f"tensor {name!r} has no shape or dtype")
            end = max(end, stop)
        if 8 + n + end > size:
            raise ValueError(f"header promises {8 + n + end} bytes, file has {size} (truncated?)")
        return header
    except (ValueError, UnicodeDecodeError, json.JSONDecodeError, struct.error, OverflowError, TypeError) as e:
        raise CheckpointCorrupt(f"Reading weights from {file}", found=f"not a valid safetensors file: {e}",
                                fix="download or save the checkpoint again; the file is damaged or was cut short") from e


def find_weight_files(path: Path, allow_pickle: bool) -> tuple[tuple[Path, ...], bool]:
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted({path / s for s in weight_map.values()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointCorrupt(f"Reading {index}", found=f"not a valid shard index ({e})",
                                    fix="restore the index file from the original checkpoint") from e
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
                                   found=f"only pickle weight files ({pickled[0].name}); unpickling can run arbitrary code",
                                   fix="convert it to safetensors, or pass allow_pickle=True if you trust its origin")
        return tuple(pickled), False
    raise CheckpointIncomplete(f"Loading the checkpoint in {path}", found="config.json but no weight files (*.safetensors)",
                               fix="copy the weight files next to config.json, or point at the right directory")


def inspect_checkpoint(path: Path, allow_pickle: bool = False, check_weights: bool = True) -> CheckpointInfo:
    """Validate a local checkpoint directory cheaply (headers only) before anything heavy happens."""
    config = read_config(path)
    files, safe = find_weight_files(path, allow_pickle)
    if check_weights and safe:
        for f in files:
            read_safetensors_header(f)
    return CheckpointInfo(path=path, config=config, weight_files=files, safetensors=safe)
