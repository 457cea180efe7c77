"""A model's shape without loading it (what `fastload estimate` needs): its config.json when one is on this machine,
else the registry's parameter count."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fastload.errors import InvalidOption, ModelNotFound


def config_or_param_count(name: str) -> tuple[Any, str]:
    """The config of `name`, or its parameter count when no config is on this machine, and where it came from.

    Args:
        name: a folder with config.json, a registry name, or anything `fastload.resolve` accepts.
    Returns:
        (config dict, or the parameter count as a float; a sentence naming the source).
    Raises:
        ModelNotFound: the folder has no config.json, or nothing on this machine nor in the registry gives a shape.
    """
    from fastload.sources.checkpoint_files import read_config
    from fastload.sources.registry import get_registry
    from fastload.sources.resolve import resolve

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"Estimating memory for {path}", found="the folder has no config.json",
                                fix="pass a checkpoint folder, a registry name or a hub id in the HF cache")
        return read_config(path), f"{path / 'config.json'}"
    match = get_registry().find(name)
    try:
        plan = resolve(name)
    except ModelNotFound:
        if match is None or not match.entry.params:
            raise
        plan = None
    if plan is not None:
        if plan.config:
            return plan.config, f"the config of {plan.location}"
        if (Path(plan.location) / "config.json").is_file():
            return read_config(Path(plan.location)), f"the config of {plan.location}"
    if match is not None and match.entry.params:  # nothing on this machine yet (a download would be needed)
        return _param_count(match.entry), (f"the registry's parameter count of {match.entry.id} (approximate: no "
                                           "config on this machine, a Llama-like shape is assumed)")
    raise ModelNotFound(f"Estimating memory for {name!r}", found=f"no config.json of it on this machine "
                        f"({plan.source}: {plan.location}) and no parameter count in the registry",
                        fix="download it first (huggingface-cli download), or pass a folder with config.json")


def _param_count(entry) -> float:
    """The registry's parameter count of `entry`, refused when it is no positive finite number (nan, inf, text)."""
    params = entry.params
    if isinstance(params, bool) or not isinstance(params, (int, float)) or not math.isfinite(params) or params <= 0:
        raise InvalidOption(f"Estimating memory for {entry.id}", found=f"its registry entry ({entry.origin}) gives "
                            f"params = {params!r}, not a positive parameter count",
                            fix="correct params in that registry file, or pass a folder with config.json")
    return float(params)
