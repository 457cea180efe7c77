"""One logger for the package; decisions are logged at INFO, one line each."""

import contextlib
import logging
import warnings
from collections.abc import Iterator

logger = logging.getLogger("fastload")


def set_verbosity(level: int | str) -> None:
    """Show fastload's decision lines (INFO) or only warnings (WARNING): `fastload.set_verbosity("INFO")`."""
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("fastload: %(message)s"))
        logger.addHandler(handler)


# Other libraries' notices about calls fastload makes on the user's behalf, which the user cannot act on. Each is
# silenced only where fastload makes that call (never process-wide), so the user's own calls still warn.
PEFT_ASKS_OLD_CHECKPOINTING_NAME = r"`is_gradient_checkpointing` is deprecated"  # peft's PeftModel.__init__
# TRL's DPO/KTO/GRPO trainers switch checkpointing off and on around each reference or scoring pass, by the old names
TRL_TOGGLES_OLD_CHECKPOINTING_NAMES = \
    r"`(is_gradient_checkpointing|gradient_checkpointing_enable|gradient_checkpointing_disable)` is deprecated"
BNB_KERNELS_HINT = "Failed to load CPU gemm_4bit_forward from kernels-community"  # a hub download fastload never wants
# the same fetch, offline: the `kernels` package (installed with transformers from 5.2x) says it skips its check
BNB_KERNELS_OFFLINE = "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"
BNB_KERNEL_FETCH_NOTICES = (("bitsandbytes.backends.cpu.ops", BNB_KERNELS_HINT),
                            ("kernels._internals.hf_hub", BNB_KERNELS_OFFLINE))


@contextlib.contextmanager
def quiet_foreign_deprecations() -> Iterator[None]:
    """Around a peft call: its use of transformers' renamed checkpointing property is not the user's to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_ASKS_OLD_CHECKPOINTING_NAME, category=FutureWarning)
        yield


@contextlib.contextmanager
def quiet_trl_checkpointing_toggles() -> Iterator[None]:
    """Around the train() of a TRL trainer fastload built: TRL's per-step checkpointing switches by transformers'
    old names are not the user's to fix (its own call sites; nothing process-wide)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TRL_TOGGLES_OLD_CHECKPOINTING_NAMES, category=FutureWarning)
        yield


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def drop_bitsandbytes_kernels_hint() -> None:
    """bitsandbytes' CPU backend, on an AVX512-BF16 CPU, tries to fetch a kernel from the hub through the optional
    `kernels` package, which says it skips its publisher check when offline, and bitsandbytes logs a hint to install
    it when the fetch fails; fastload does not need that kernel. Each filter sits on the one logger that says it
    and drops that one message."""
    for name, start in BNB_KERNEL_FETCH_NOTICES:
        hinting = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.start == start for f in hinting.filters):
            hinting.addFilter(_DropMessage(start))
