"""LoadPlan: what from_pretrained will read, whether it is already quantized, and why that source won."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastload.settings import QuantSettings

if TYPE_CHECKING:
    from fastload.sources.registry import RegistryEntry

# Where a plan's weights come from.
LOCAL = "local"                    # a directory the user named
STORE = "store"                    # fastload's own store of checkpoints it quantized before
HUB_CACHE = "hub-cache"            # a hub repo already in the Hugging Face cache
HUB_DOWNLOAD = "hub-download"      # a hub repo to download (only when online is allowed)
PACKAGED_GGUF = "packaged-gguf"    # a GGUF file shipped inside an installed Python package
GGUF_FILE = "gguf-file"            # a .gguf file the user named


@dataclass(frozen=True)
class LoadPlan:
    name: str                          # what the user asked for, as typed
    source: str                        # one of the constants above
    location: str                      # directory, file or repo id that will be read
    prequantized: bool                 # True: load as stored, no quantization work
    quant: QuantSettings               # settings for on-the-fly quantization (prequantized: what was asked)
    reason: str                        # why this source won
    revision: str | None = None
    original: str | None = None        # the 16-bit source (repo id or path): what merges go back to
    store_key: str | None = None       # where an on-the-fly quantization is stored; None: store off
    fingerprint: str | None = None     # what exactly the 16-bit source was: a hub commit, or a local content hash
    gguf_file: str | None = None
    adapter: str | None = None         # a LoRA adapter directory to put on top (the base is this plan)
    registry_entry: "RegistryEntry | None" = None
    config: dict | None = field(default=None, repr=False, compare=False)  # config.json when it could be read
    tried: tuple[str, ...] = ()

    @property
    def will_download(self) -> bool:
        return self.source == HUB_DOWNLOAD

    def explain(self) -> str:
        """A few lines a user can read: the chosen source, why, and every source tried before it."""
        what = ("pre-quantized, loaded as stored" if self.prequantized
                else f"quantize on the fly: {self.quant.describe()}")
        if not self.quant.quantized and not self.prequantized:
            what = "16-bit, no quantization"
        lines = [f"{self.name!r} -> {self.source}: {self.location}" + (f" @ {self.revision}" if self.revision else ""),
                 f"  {what}", f"  why: {self.reason}"]
        if self.original and self.original != self.location:
            lines.append(f"  16-bit source: {self.original}")
        if self.adapter:
            lines.append(f"  LoRA adapter on top: {self.adapter}")
        if self.store_key and not self.prequantized:
            lines.append(f"  will be stored as {self.store_key} after quantizing")
        for t in self.tried:
            lines.append(f"  tried: {t}")
        return "\n".join(lines)

    __str__ = explain
