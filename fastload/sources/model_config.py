"""A model's shape without loading it (what `fastload estimate` needs): its config.json when one is on this machine,
else the registry's parameter count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastload.errors import ModelNotFound


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
        return float(match.entry.params), (f"the registry's parameter count of {match.entry.id} (approximate: no "
                                           "config on this machine, a Llama-like shape is assumed)")
    raise ModelNotFound(f"Estimating memory for {name!r}", found=f"no config.json of it on this machine "
                        f"({plan.source}: {plan.location}) and no parameter count in the registry",
                        fix="download it first (huggingface-cli download), or pass a folder with config.json")
