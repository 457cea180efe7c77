"""The folder a save writes: fastload.atomic's writer (a temporary sibling swapped into place), with a disk or
permission problem reported as a SaveError. Every save (adapter, merged, 4-bit, GGUF) writes through it."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator

from fastload.atomic import atomic_folder, disk_full_error
from fastload.errors import FastloadError, SaveError


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, marker: str = "config.json",
                     into_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `directory` (fastload.atomic), on any error (or
    Ctrl-C) it is removed and a disk or permission problem becomes a SaveError.

    An existing non-empty folder is written only when it is a previous save (it holds `marker` or fastload's record),
    or with into_existing; files fastload did not write are never overwritten, and folders in it (checkpoint-N)
    are kept.
    """
    directory = Path(directory).expanduser().absolute()
    kind = "adapter" if marker == "adapter_config.json" else "model"
    try:
        with atomic_folder(directory, kind=kind, marker_file=marker, into_existing=into_existing) as tmp:
            yield tmp
    except FastloadError:
        raise
    except OSError as e:
        raise save_error(directory, e) from e
    except Exception as e:  # safetensors and torch report a full disk with their own exception types
        full = disk_full_error(e, directory)
        if full is None:
            raise
        raise save_error(directory, full) from e


def save_error(directory: Path, e: OSError) -> SaveError:
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    return SaveError(f"Saving to {directory}", found="the disk is full" if full else f"{type(e).__name__}: {e}",
                     fix="free space or save elsewhere; the previous save (if any) is unchanged"
                         if full else "check the folder's permissions, or save elsewhere")

