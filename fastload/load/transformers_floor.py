"""The transformers release a model type needs (transformers_floor.toml), checked before any weight is read.

A modeling bug in an older transformers surfaces as a raw dtype error in the first forward, after a load that looked
fine; fastload cannot fix transformers' arithmetic, so the load says which release runs the model instead.
"""

from __future__ import annotations

import functools
import tomllib
from importlib import resources

from fastload.errors import UnsupportedArchitecture


@functools.cache
def _floors() -> dict[str, dict]:
    return tomllib.loads(resources.files(__package__).joinpath("transformers_floor.toml").read_text(encoding="utf-8"))


def _release(version: str) -> tuple[int, ...]:
    """(5, 20, 0) from '5.20.0' or '5.20.0.dev0': the numeric release, suffixes dropped."""
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def installed_transformers() -> str:
    import transformers

    return transformers.__version__


def release_needed(model_type: str | None, dtype, installed: str | None = None) -> str | None:
    """The transformers release `model_type` needs in `dtype` when the installed one is older, else None."""
    floor = _floors().get(model_type or "")
    if floor is None or str(dtype).replace("torch.", "") not in floor["dtypes"]:
        return None
    installed = installed or installed_transformers()
    return floor["min_version"] if _release(installed) < _release(floor["min_version"]) else None


def check_transformers_floor(model_type: str | None, dtype, name: str, installed: str | None = None) -> None:
    """Raise UnsupportedArchitecture when the installed transformers cannot run `model_type` in `dtype`."""
    installed = installed or installed_transformers()
    if release_needed(model_type, dtype, installed) is None:
        return
    floor = _floors()[model_type]
    raise UnsupportedArchitecture(
        f"Loading {name!r} ({model_type}) in {str(dtype).replace('torch.', '')}",
        found=f"transformers {installed}: {floor['why']}",
        fix=f"pip install 'transformers>={floor['min_version']}' (or load with dtype='float32')")
