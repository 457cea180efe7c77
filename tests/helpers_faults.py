"""Building damaged checkpoints and watching what a load leaves behind: shared by the reliability, fuzz and
concurrency tests. Plain byte and JSON surgery on real files, no mocks."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

WEIGHTS = "model.safetensors"


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, drop: tuple[str, ...] = (), **values) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(values)
    for key in drop:
        cfg.pop(key, None)
    (path / "config.json").write_text(json.dumps(cfg))


def read_safetensors(file: Path) -> tuple[dict, bytes]:
    """(header, tensor bytes) of a safetensors file."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def pack_safetensors(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes
    return struct.pack("<Q", len(blob)) + blob + data


def write_safetensors(file: Path, header: dict, data: bytes) -> None:
    file.write_bytes(pack_safetensors(header, data))


def drop_tensor(file: Path, name: str) -> None:
    """Remove one tensor and its bytes, keeping the file valid: a whole file that lacks a weight."""
    header, data = read_safetensors(file)
    kept, out, offset = {}, bytearray(), 0
    tensors = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
    for key, meta in tensors:
        if key == name:
            continue
        begin, end = meta["data_offsets"]
        out += data[begin:end]
        kept[key] = {**meta, "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
    if "__metadata__" in header:
        kept["__metadata__"] = header["__metadata__"]
    write_safetensors(file, kept, bytes(out))


def tree_snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file below root, folders named in `skip` left out (lock files are not content)."""
    snap = {}
    if root.exists():
        for p in sorted(root.rglob("*")):
            if p.is_file() and not any(part in skip for part in p.relative_to(root).parts):
                st = p.stat()
                snap[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return snap


def leftover_tmp(store_root: Path) -> list[str]:
    tmp = store_root / "tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else []


def logits(model, input_ids):
    import torch

    with torch.no_grad():
        return model(input_ids).logits.float()
