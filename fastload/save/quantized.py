"""Writing a 4-bit checkpoint to a folder of the user's choice (`fastload quantize --out`): a loaded model saved as
bitsandbytes 4-bit, or a 4-bit checkpoint already on this machine copied as it is, without loading it.

Both go through fastload.atomic: nothing half-written at the destination, even on Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fastload.errors import InvalidOption
from fastload.save.folders import atomic_directory


def copy_checkpoint(src: Path, dst: Path) -> None:
    """Copy every file of a checkpoint folder but the store's manifest (hub-cache links are followed)."""
    from fastload.sources.store import MANIFEST

    for f in sorted(src.iterdir()):
        if f.is_file() and f.name != MANIFEST:
            shutil.copyfile(f, dst / f.name)


def copy_prequantized(files: Path, out: str | os.PathLike, asked: str) -> Path:
    """Copy a 4-bit checkpoint as it is into `out`, checked as a load would check it (complete, safetensors,
    tokenizer); never into itself (a store entry would find a stranger and be removed).

    Args:
        files: the folder holding the 4-bit checkpoint.
        out: the folder to write.
        asked: what was asked, for error messages.
    Returns:
        The absolute path written.
    Raises:
        InvalidOption: `out` is the checkpoint or lies inside it.
        CheckpointError: the checkpoint is incomplete, unsafe or lacks its tokenizer.
        SaveError: the disk is full or the folder cannot be written (nothing is left at `out`).
    """
    from fastload.sources.checkpoint_files import check_tokenizer_files, inspect_checkpoint

    out = Path(out).expanduser().absolute()
    if out.resolve() == files.resolve() or files.resolve() in out.resolve().parents:
        raise InvalidOption(asked, found=f"{out} is inside the checkpoint it would copy ({files})",
                            fix="pass an --out folder outside it")
    inspect_checkpoint(files)
    check_tokenizer_files(files)
    with atomic_directory(out) as tmp:
        copy_checkpoint(files, tmp)
    return out


def save_quantized(model, tokenizer, out: str | os.PathLike) -> Path:
    """Save a model loaded in 4-bit, with its tokenizer, as a checkpoint fastload later loads pre-quantized.

    Args:
        model: the model (loaded without LoRA adapters).
        tokenizer: its tokenizer.
        out: the folder to write.
    Returns:
        The absolute path written.
    Raises:
        SaveError: the disk is full or the folder cannot be written (nothing is left at `out`).
    """
    from fastload.load.experts import experts_in_16bit

    out = Path(out).expanduser().absolute()
    # bitsandbytes' checkpoints hold no 4-bit experts: they are written 16-bit (the 4-bit values, dequantized on
    # the CPU) and quantized again when loaded
    with atomic_directory(out) as tmp, experts_in_16bit(model, "cpu"):
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    return out
