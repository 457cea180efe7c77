"""One logger for the package; decisions are logged at INFO, one line each."""

import logging

logger = logging.getLogger("fastload")


def set_verbosity(level: int | str) -> None:
    """Show fastload's decision lines (INFO) or only warnings (WARNING): `fastload.set_verbosity("INFO")`."""
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("fastload: %(message)s"))
        logger.addHandler(handler)
