"""argparse types: a value no command can use is a usage error (exit 2) caught by the parser, before anything loads.

Each type names the kind of value it wants; argparse adds the option's name (`argument --lr: ...`).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

SEED_LIMIT = 2 ** 32  # numpy's and torch's seeding both take 0 .. 2**32 - 1


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """A count such as --batch or --r: 1 or more."""
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


def non_negative_int(text: str) -> int:
    """--steps: 0 means "use --epochs"; a negative count is refused, not ignored."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def positive_float(text: str) -> float:
    """--epochs, --lr: a positive finite number (nan and inf would train nothing, or garbage)."""
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value


def non_negative_float(text: str) -> float:
    """--temperature: 0 (greedy) or a positive finite number."""
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more")
    return value


def seed(text: str) -> int:
    """--seed: what numpy and torch accept, checked here rather than after the model has loaded."""
    value = _int(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"{value} must be between 0 and 2**32 - 1")
    return value


def message(text: str) -> str:
    """--prompt: a message with some text in it (an empty one generates from nothing the user asked)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the message is empty")
    return text


def out_folder(text: str) -> str:
    """--out: a folder to write, new or existing, never an existing file (such as the data file)."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is an existing file, not a folder")
    return text
