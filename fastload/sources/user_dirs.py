"""Per-user folders, following each platform's convention (XDG on Linux), without a dependency for it."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _base(env: str, unix_default: str, mac: str, windows_env: str) -> Path:
    if sys.platform == "win32":
        return Path(os.environ.get(windows_env) or Path.home() / "AppData" / "Local")
    if sys.platform == "darwin":
        return Path.home() / "Library" / mac
    return Path(os.environ.get(env) or Path.home() / unix_default)


def user_cache_dir() -> Path:
    """Where the store lives unless FASTLOAD_HOME says otherwise: ~/.cache/fastload on Linux."""
    return _base("XDG_CACHE_HOME", ".cache", "Caches", "LOCALAPPDATA") / "fastload"


def user_config_dir() -> Path:
    """Where a user's registry.toml is read from: ~/.config/fastload on Linux."""
    return _base("XDG_CONFIG_HOME", ".config", "Application Support", "APPDATA") / "fastload"
