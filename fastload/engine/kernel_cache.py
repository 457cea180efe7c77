"""Compiled kernels and autotune choices kept across processes, under FASTLOAD_HOME/kernels/<key>.

A second run should not pay Triton's compile (seconds) and the LoRA kernel's autotune (every tile timed per weight
shape) again. Both depend on the GPU, its compute capability and the Triton, torch and fastload versions, so the
folder is keyed by all of them: an upgrade or another GPU starts a fresh folder instead of reading a stale one.
Triton keeps its compiled kernels in TRITON_CACHE_DIR (pointed here unless the user set it); fastload's own
autotune choices are a small JSON file written atomically. A cache that cannot be read is ignored (debug log):
the kernels are compiled and timed again, never an error.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import threading
from pathlib import Path

from fastload._log import logger
from fastload.atomic import atomic_file

TRITON_ENV = "TRITON_CACHE_DIR"
CHOICES_FILE = "autotune.json"
FORMAT = 1  # of CHOICES_FILE; another number is read as no choices
_lock = threading.Lock()


def cache_key(gpu_name: str, capability: tuple[int, int], triton_version: str | None, torch_version: str,
              fastload_version: str) -> str:
    """The folder name for one GPU model and software versions: readable, and safe as a file name.

    Args:
        gpu_name: torch.cuda.get_device_name(), e.g. "NVIDIA H200".
        capability: torch.cuda.get_device_capability(), e.g. (9, 0).
        triton_version: triton.__version__ (None: not installed).
        torch_version: torch.__version__.
        fastload_version: fastload.__version__.

    Returns:
        e.g. "nvidia-h200-sm90-triton3.4.0-torch2.8.0-fastload0.1.0".
    """
    parts = [gpu_name, f"sm{capability[0]}{capability[1]}", f"triton{triton_version or 'none'}",
             f"torch{torch_version}", f"fastload{fastload_version}"]
    return "-".join(re.sub(r"[^a-z0-9.+]+", "_", p.strip().lower()).strip("_") for p in parts)


def home() -> Path:
    """FASTLOAD_HOME (where the store lives too), else the user cache folder."""
    from fastload.sources.store import default_root

    return default_root()


@functools.cache
def cache_dir_for(device_index: int) -> Path:
    """This process's kernel cache folder for one CUDA device (asked once per device)."""
    import importlib.metadata

    import torch

    from fastload import __version__

    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    key = cache_key(torch.cuda.get_device_name(device_index), torch.cuda.get_device_capability(device_index),
                    triton_version, torch.__version__, __version__)
    return home() / "kernels" / key


def point_triton_cache(folder: Path) -> bool:
    """Set TRITON_CACHE_DIR to `folder` unless the user set it; True when it now points there.

    Triton reads the variable when it first needs its cache, so this runs before any fastload kernel is compiled.
    """
    if os.environ.get(TRITON_ENV):
        logger.debug("kernel cache: TRITON_CACHE_DIR=%s is the user's; kept", os.environ[TRITON_ENV])
        return False
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        logger.debug("kernel cache: %s cannot be made (%s); Triton keeps its default cache", folder, e)
        return False
    os.environ[TRITON_ENV] = str(folder / "triton")
    if "triton" in sys.modules:
        logger.debug("kernel cache: triton was imported before fastload pointed its cache; a Triton version that "
                     "read the variable at import keeps its default folder")
    return True


def read_choices(folder: Path) -> dict[str, dict]:
    """The autotune choices stored in `folder` (key -> launch settings); {} when absent, stale or unreadable."""
    path = folder / CHOICES_FILE
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("choices"), dict):
            raise ValueError(f"not a format-{FORMAT} choices file")
        return {k: v for k, v in data["choices"].items() if isinstance(k, str) and isinstance(v, dict)}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        logger.debug("kernel cache: %s ignored (%s: %s); kernels are timed again", path, type(e).__name__, e)
        return {}


def write_choices(folder: Path, choices: dict[str, dict]) -> None:
    """Replace the choices file in one step (a temporary sibling renamed over it): a reader sees the old file or
    the new one, never part of one. A failure to write is logged at debug level only: the cache is an extra."""
    path = folder / CHOICES_FILE
    try:
        with atomic_file(path) as tmp, open(tmp, "w") as fh:
            json.dump({"format": FORMAT, "choices": choices}, fh, sort_keys=True)
    except (OSError, TypeError, ValueError) as e:
        logger.debug("kernel cache: %s not written (%s: %s)", path, type(e).__name__, e)


class AutotuneChoices:
    """One kernel family's autotune results for one cache folder: looked up in memory, kept on disk."""

    def __init__(self, folder: Path | None, kernel: str):
        self.folder, self.kernel = folder, kernel
        self._known: dict[str, dict] | None = None

    def _key(self, shape_key: tuple) -> str:
        return f"{self.kernel}:" + ",".join(str(part) for part in shape_key)

    def _all(self) -> dict[str, dict]:
        if self._known is None:
            self._known = read_choices(self.folder) if self.folder is not None else {}
        return self._known

    def get(self, shape_key: tuple) -> dict | None:
        return self._all().get(self._key(shape_key))

    def remember(self, shape_key: tuple, choice: dict) -> None:
        """Keep a new choice, merged with what another process may have written since this one read the file."""
        with _lock:
            self._all()[self._key(shape_key)] = choice
            if self.folder is not None:
                merged = {**read_choices(self.folder), **self._known}
                write_choices(self.folder, merged)
