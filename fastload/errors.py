"""fastload's error hierarchy: every failure a user can cause says what was asked, what was found, what to do."""

from __future__ import annotations


class FastloadError(Exception):
    """Base class. `asked`, `found` and `fix` are kept as attributes so tools can show them apart."""

    def __init__(self, asked: str, found: str = "", fix: str = ""):
        self.asked, self.found, self.fix = asked, found, fix
        lines = [asked]
        if found:
            lines.append(f"  found: {found}")
        if fix:
            lines.append(f"  what to do: {fix}")
        super().__init__("\n".join(lines))


class InvalidOption(FastloadError, ValueError):
    """An option value that cannot work, or two options that contradict each other."""


class ModelNotFound(FastloadError, FileNotFoundError):
    """No source could provide the model: unknown name, missing path, offline without a cached copy."""


class GatedModel(ModelNotFound):
    """The hub refuses the repository without accepted terms or a token."""


class CheckpointError(FastloadError):
    """A checkpoint on disk cannot be loaded as it is."""


class CheckpointIncomplete(CheckpointError):
    """Config or weight files are missing, or the weights do not match the config."""


class CheckpointCorrupt(CheckpointError):
    """A file exists but its bytes are not what they claim to be (truncated, altered, unparsable)."""


class UnsafeCheckpoint(CheckpointError):
    """The checkpoint needs pickle (`.bin`/`.pt`), which can run code; refused unless allow_pickle=True."""


class UnsupportedArchitecture(FastloadError):
    """The model's structure has no decoder layers with linear projections that LoRA can target."""


class DeviceUnavailable(FastloadError):
    """The request needs hardware (a CUDA GPU, bf16 support) that this machine lacks."""


class NotEnoughMemory(FastloadError, MemoryError):
    """The load is predicted not to fit, before any weight is read."""


class BackendUnavailable(FastloadError):
    """A backend (unsloth) or attention plugin (xformers) was asked for but cannot run here."""


class StoreError(FastloadError):
    """The local store of quantized checkpoints cannot be read or written."""


class StoreEntryCorrupt(StoreError):
    """A store entry changed on disk after it was written; it is never loaded, only rebuilt."""


class SaveError(FastloadError, OSError):
    """A save (adapter, merged checkpoint) could not be written: disk full, no permission. The previous save stays."""


class AdapterError(FastloadError):
    """LoRA adapters cannot be added, loaded, saved or merged as asked."""


class RankFailed(FastloadError):
    """Another process of a torchrun / accelerate launch failed; this one stops too instead of waiting for it."""
