"""The local store: every checkpoint fastload quantized, saved once so the next load is a pre-quantized load.

Entries are written into a temporary folder and renamed into place under a per-entry lock, so a reader sees a
whole entry or none. Each entry's manifest records every file's size, mtime, sha256 and a sampled sha256; a file
whose size differs, whose mtime differs and whose hash no longer matches, or whose sample hash (checked on every
load) differs marks the entry corrupt: never loaded, rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from fastload._log import logger
from fastload.atomic import (  # noqa: F401
    MARKER,
    atomic_folder,
    clean_leftovers,
    discard,
    disk_full_error,
    pid_alive,  # pid_alive: re-export
)
from fastload.errors import FastloadError, StoreEntryCorrupt, StoreError
from fastload.settings import QuantSettings
from fastload.sources.checkpoint_files import is_plain_file_name

FORMAT_VERSION = 1
MANIFEST = "fastload-manifest.json"


def default_root() -> Path:
    """FASTLOAD_HOME, else the user cache dir (e.g. ~/.cache/fastload)."""
    env = os.environ.get("FASTLOAD_HOME")
    if env:
        return Path(env).expanduser()
    from fastload.sources.user_dirs import user_cache_dir

    return user_cache_dir()


def entry_key(source: str, revision: str | None, quant: QuantSettings) -> str:
    """Stable key of (16-bit source, its revision or content fingerprint, quantization settings)."""
    blob = json.dumps([source, revision or "default", quant.fingerprint()]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# files up to this size are hashed whole on every load; larger ones by a sample: their first and last MiB and
# SAMPLE_BLOCKS blocks spread between (a few MiB read whatever the size; `cache verify` hashes everything)
WHOLE_HASH_BYTES = 16 << 20
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES, SAMPLE_EDGE_BYTES = 64, 64 << 10, 1 << 20


def file_sample_sha256(path: Path) -> str:
    """sha256 of a file, or for a large one of a fixed sample of it: a changed header, tail or spread block is seen
    at load time without reading gigabytes."""
    size = path.stat().st_size
    if size <= WHOLE_HASH_BYTES:
        return file_sha256(path)
    h = hashlib.sha256()
    step = (size - 2 * SAMPLE_EDGE_BYTES) // (SAMPLE_BLOCKS + 1)
    spans = [(0, SAMPLE_EDGE_BYTES), *((SAMPLE_EDGE_BYTES + step * (i + 1), SAMPLE_BLOCK_BYTES)
                                       for i in range(SAMPLE_BLOCKS)), (size - SAMPLE_EDGE_BYTES, SAMPLE_EDGE_BYTES)]
    with open(path, "rb") as f:
        for offset, length in spans:
            f.seek(offset)
            h.update(f.read(length))
    return h.hexdigest()


def manifest_problem(manifest, key: str) -> str | None:
    """What makes a manifest unusable (hand-edited, another format, wrong types), or None: a manifest is data from
    disk, and every later load, `cache list`, `verify` and `rm` must survive a damaged one."""
    if not isinstance(manifest, dict):
        return f"the manifest is a {type(manifest).__name__}, not an object"
    if manifest.get("format") != FORMAT_VERSION or manifest.get("key") != key:
        return "manifest of another format or key"
    source, files = manifest.get("source"), manifest.get("files")
    if not isinstance(source, dict) or not isinstance(source.get("id"), str):
        return "the manifest names no source"
    if not isinstance(files, dict):
        return "the manifest's file list is not an object"
    for name, meta in files.items():
        if not is_plain_file_name(name):
            return f"the manifest names a file outside the entry: {name!r}"
        if not isinstance(meta, dict) or not all(isinstance(meta.get(k), int) and not isinstance(meta.get(k), bool)
                                                 for k in ("size", "mtime_ns")) \
                or not isinstance(meta.get("sha256"), str) or not isinstance(meta.get("sample_sha256", ""), str):
            return f"the manifest's record of {name!r} is damaged"
    return None


def kept_16bit(entry_dir: Path) -> list[str]:
    """The layers fastload/layer_rules.toml keeps 16-bit for the model type in this folder's config.json: what a
    store entry was quantized around, recorded in its manifest. A config that cannot be read keeps none."""
    from fastload.layer_rules import kept_unquantized

    try:
        model_type = json.loads((entry_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return []
    return sorted(kept_unquantized(model_type if isinstance(model_type, str) else None))


def stale_rules(manifest: dict, entry_dir: Path) -> str | None:
    """Why an entry was quantized under other layer rules than this fastload's (a layer now kept 16-bit was stored
    4-bit, or the reverse), or None. Entries written before the manifest recorded them kept none."""
    stored, now = manifest.get("kept_16bit", []), kept_16bit(entry_dir)
    if stored == now:
        return None
    return (f"it was quantized keeping {stored or 'no layers'} 16-bit; this fastload keeps {now or 'none'} 16-bit "
            "for this model type")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "--", text.strip("/"))[-80:]


@dataclass(frozen=True)
class StoreEntry:
    key: str
    path: Path
    manifest: dict

    @property
    def source(self) -> str:
        return self.manifest["source"]["id"]

    @property
    def size_bytes(self) -> int:
        return sum(f["size"] for f in self.manifest["files"].values())


class Store:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.entries_dir = self.root / "quantized"
        self.tmp_dir = self.root / "tmp"
        self.locks_dir = self.root / "locks"

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # -- reading ----------------------------------------------------------------------------------------------
    def _find_dir(self, key: str) -> Path | None:
        if not self.entries_dir.is_dir():
            return None
        return next(iter(sorted(self.entries_dir.glob(f"*--{key}"))), None)

    def _read_manifest(self, path: Path, key: str) -> dict:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise StoreEntryCorrupt(f"Reading store entry {path.name}", found=f"its manifest is missing or damaged "
                                    f"({type(e).__name__}: {str(e)[:200]})",
                                    fix="it will be rebuilt; or remove it with `fastload cache rm`") from e
        problem = manifest_problem(manifest, key)
        if problem:
            raise StoreEntryCorrupt(f"Reading store entry {path.name}", found=problem,
                                    fix="it will be rebuilt; or remove it with `fastload cache rm`")
        return manifest

    def check(self, path: Path, key: str, full: bool = False) -> dict:
        """Return the manifest if the entry is whole; raise StoreEntryCorrupt naming the first bad file otherwise."""
        manifest = self._read_manifest(path, key)
        on_disk = {p.name for p in path.iterdir() if p.name != MANIFEST}
        extra = on_disk - set(manifest["files"])
        if extra:
            raise StoreEntryCorrupt(f"Checking store entry {path.name}",
                                    found=f"files not in its manifest: {sorted(extra)}",
                                    fix="it will be rebuilt; or remove it with `fastload cache rm`")
        for name, meta in manifest["files"].items():
            f = path / name
            try:
                st = f.stat()
            except OSError:
                raise StoreEntryCorrupt(f"Checking store entry {path.name}", found=f"{name} is missing",
                                        fix="it will be rebuilt; or remove it with `fastload cache rm`") from None
            if st.st_size != meta["size"]:
                raise StoreEntryCorrupt(f"Checking store entry {path.name}",
                                        found=f"{name} has {st.st_size} bytes, "
                                              f"the manifest says {meta['size']} (truncated?)",
                                        fix="it will be rebuilt; or remove it with `fastload cache rm`")
            if (full or st.st_mtime_ns != meta["mtime_ns"]) and file_sha256(f) != meta["sha256"] \
                    or not full and meta.get("sample_sha256") and file_sample_sha256(f) != meta["sample_sha256"]:
                raise StoreEntryCorrupt(f"Checking store entry {path.name}",
                                        found=f"{name} changed since it was written",
                                        fix="it will be rebuilt; or remove it with `fastload cache rm`")
        return manifest

    def lookup(self, key: str) -> StoreEntry | None:
        """The whole entry for this key, or None. A damaged entry is reported, removed, and reads as None."""
        path = self._find_dir(key)
        if path is None:
            return None
        try:
            manifest = self.check(path, key)
        except StoreEntryCorrupt as e:
            logger.warning("store entry %s is damaged and will be rebuilt: %s", path.name, e.found)
            self._discard(path)
            return None
        stale = stale_rules(manifest, path)
        if stale:
            logger.warning("store entry %s will be rebuilt: %s", path.name, stale)
            self._discard(path)
            return None
        return StoreEntry(key, path, manifest)

    def entries(self) -> list[StoreEntry]:
        found = []
        for path in sorted(self.entries_dir.glob("*--*")) if self.entries_dir.is_dir() else []:
            key = path.name.rsplit("--", 1)[-1]
            try:
                found.append(StoreEntry(key, path, self._read_manifest(path, key)))
            except StoreEntryCorrupt:
                found.append(StoreEntry(key, path, {"source": {"id": "?"}, "files": {}, "damaged": True}))
        return found

    def verify(self) -> list[tuple[StoreEntry, str | None]]:
        """Hash every file of every entry: (entry, None) when whole, (entry, problem) otherwise."""
        results = []
        for entry in self.entries():
            try:
                self.check(entry.path, entry.key, full=True)
                results.append((entry, None))
            except StoreEntryCorrupt as e:
                results.append((entry, e.found))
        return results

    def remove(self, key_or_source: str) -> list[StoreEntry]:
        """Remove entries whose key or source id matches; returns what was removed."""
        gone = [e for e in self.entries() if key_or_source in (e.key, e.source) or e.path.name == key_or_source]
        for e in gone:
            self._discard(e.path)
        return gone

    # -- writing ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, key: str, timeout: float = 3600) -> Iterator[None]:
        """Hold the per-entry lock: a second process loading the same model waits, then reads the finished entry."""
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.locks_dir / f"{key}.lock"))
        try:
            self.locks_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire(timeout=timeout)
        except OSError as e:
            raise StoreError(f"Locking store entry {key} in {self.root}", found=f"{type(e).__name__}: {e}",
                             fix="check that FASTLOAD_HOME is a writable folder, or pass store=False") from e
        except Timeout as e:
            raise StoreError(f"Waiting for the store lock of entry {key}",
                             found=f"another process held it for {timeout:.0f} s",
                             fix=f"wait for the other load to finish, "
                                 f"or remove {lock.lock_file} if no process holds it") from e
        try:
            yield
        finally:
            lock.release()

    def write(self, key: str, source: dict, quant: QuantSettings, save: Callable[[Path], None]) -> StoreEntry:
        """Run save(tmp_dir), record a manifest and rename the folder into place; nothing partial ever stays visible.

        The caller holds self.lock(key). Errors (disk full, interrupt) remove the temporary folder and re-raise.
        """
        self.cleanup_tmp()
        final = self.entries_dir / f"{_slug(source['id'])}--{key}"
        try:
            self.entries_dir.mkdir(parents=True, exist_ok=True)
            if final.exists():  # a damaged leftover: replace it
                self._discard(final)
            with atomic_folder(final, kind="store entry", staging=self.tmp_dir, record=False) as tmp:
                save(tmp)
                files = {}
                for f in sorted(tmp.iterdir()):
                    if f.name == MARKER:
                        continue
                    st = f.stat()
                    files[f.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(f),
                                     "sample_sha256": file_sample_sha256(f)}
                from fastload import __version__

                manifest = {"format": FORMAT_VERSION, "key": key, "fastload_version": __version__,
                            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": source,
                            "quantization": {k: v for k, v in quant.__dict__.items()}, "kept_16bit": kept_16bit(tmp),
                            "files": files}
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=list))
        except FastloadError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors and torch report a full disk with their own types
            full = disk_full_error(e, self.root)
            if full is not None:
                raise StoreError(f"Storing the quantized model in {self.root}", found=f"the disk is full "
                                 f"({full.strerror})", fix="free space, set FASTLOAD_HOME to a larger disk, or pass "
                                 "store=False") from e
            if not isinstance(e, OSError):
                raise
            raise StoreError(f"Storing the quantized model in {self.root}", found=f"{type(e).__name__}: {e}",
                             fix="check permissions, set FASTLOAD_HOME elsewhere, or pass store=False") from e
        return StoreEntry(key, final, manifest)

    def cleanup_tmp(self) -> None:
        """Remove the temporary folders fastload marked as its own whose writer died (process gone) or that are
        very old; whatever else lies in tmp/ (a user's own folders, when FASTLOAD_HOME is shared) stays."""
        if self.tmp_dir.is_dir():
            clean_leftovers(self.tmp_dir)

    def _discard(self, path: Path) -> None:
        """Move aside then delete, so no reader ever sees a half-deleted entry under its real name."""
        try:
            discard(path, staging=self.tmp_dir)
        except OSError:
            return
