"""What every command shares: exit codes, printing data (stdout, JSON with --json) and progress (stderr), and the
logging set-up of --quiet / -v / -vv."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from fastload._log import logger, set_verbosity

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
GIB = 1024 ** 3


class CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (a captured stream in tests, the terminal otherwise), never a stale one."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("fastload: %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property decides instead
        pass


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    """Print data as JSON with --json, else the human-readable text."""
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


def note(args: argparse.Namespace, message: str) -> None:
    """A progress or status line on stderr; --quiet silences it."""
    if not args.quiet:
        print(f"fastload: {message}", file=sys.stderr, flush=True)


def configure_logging(args: argparse.Namespace, loads_model: bool) -> Callable[[], None]:
    """--quiet: errors only; default: fastload's decision lines; -v: fastload debug; -vv: transformers' info too.

    Args:
        args: the parsed command line.
        loads_model: whether the command imports transformers (the light commands never do).
    Returns:
        What puts the process-wide settings back (main runs in-process in tests and scripts).
    """
    fastload_level, tqdm_env = logger.level, os.environ.get("TQDM_DISABLE")
    set_verbosity(logging.ERROR if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"  # bars drawn by libraries (downloads, shard loading) too
    tlog = None
    quiet_filters = None
    if args.quiet:  # libraries' warnings (FutureWarning, bitsandbytes' kernel notices) are not errors either
        import warnings

        quiet_filters = warnings.filters[:]
        warnings.simplefilter("ignore")
        bnb_logger = logging.getLogger("bitsandbytes")
        bnb_level = bnb_logger.level
        bnb_logger.setLevel(logging.ERROR)
    if loads_model:
        import transformers.utils.logging as tlog

        transformers_level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
        tlog.set_verbosity(logging.INFO if args.verbose >= 2 else logging.ERROR if args.quiet else logging.WARNING)
        if args.quiet:
            tlog.disable_progress_bar()

    def restore() -> None:
        logger.setLevel(fastload_level)
        if quiet_filters is not None:
            import warnings

            warnings.filters[:] = quiet_filters
            logging.getLogger("bitsandbytes").setLevel(bnb_level)
        if tqdm_env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = tqdm_env
        if tlog is not None:
            tlog.set_verbosity(transformers_level)
            (tlog.enable_progress_bar if bars else tlog.disable_progress_bar)()

    return restore
