"""Warm or cold page cache for the files a load reads, and a check of which it really was.

Warm: every file read once. Cold: the files' pages evicted with posix_fadvise(DONTNEED), which needs no root and
leaves the rest of the machine's cache alone; where that does not take (some overlay filesystems), and
/proc/sys/vm/drop_caches is writable (root), the whole cache is dropped. mincore() then says how much of the files
is still in memory (pages another process maps stay), so a "cold" figure that was not cold is reported, not trusted.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

DROP_CACHES = "/proc/sys/vm/drop_caches"
COLD_ENOUGH = 0.05  # at most 5% of the bytes still cached counts as cold
_LOW_BIT = bytes(b & 1 for b in range(256))  # mincore: bit 0 is "resident", the other bits are reserved


def warm(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(1 << 24):
                pass


def timed_read(files: list[Path], chunk: int = 1 << 24) -> dict:
    """Read the files once, start to end, and time it: the disk's own speed for these bytes when they are cold."""
    import time

    started = time.perf_counter()
    total = 0
    buffer = bytearray(chunk)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buffer):
                total += n
    seconds = time.perf_counter() - started
    return {"disk_read_s": seconds, "disk_read_gbps": total / seconds / 1e9 if seconds > 0 else None}


def _fadvise_dontneed(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # dirty pages cannot be evicted: freshly written checkpoints must reach the disk first
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def can_drop_caches() -> bool:
    return os.geteuid() == 0 and os.access(DROP_CACHES, os.W_OK)


def _drop_caches() -> None:
    os.sync()
    with open(DROP_CACHES, "w") as fh:
        fh.write("1\n")


def resident_fraction(files: list[Path]) -> float | None:
    """Fraction of the files' bytes now in the page cache (Linux mincore), or None where it cannot be asked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    page = mmap.PAGESIZE
    resident = total = 0
    for f in files:
        size = f.stat().st_size
        if size == 0:
            continue
        pages = (size + page - 1) // page
        fd = os.open(f, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(addr, size, vec) != 0:
                    return None
                resident += bytes(vec).translate(_LOW_BIT).count(1)
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
        total += pages
    return resident / total if total else 0.0


def make_cold(files: list[Path], allow_drop_caches: bool = True) -> dict:
    """Evict the files from the page cache; returns how, how much stayed (None: unknown), and whether that is cold."""
    _fadvise_dontneed(files)
    method, left = "fadvise", resident_fraction(files)
    if (left is None or left > COLD_ENOUGH) and allow_drop_caches and can_drop_caches():
        _drop_caches()
        method, left = "drop_caches", resident_fraction(files)
    return {"cold_method": method, "resident_after_evict": left,
            "cold_ok": left is not None and left <= COLD_ENOUGH}


def cold_unavailable(directory: Path, allow_drop_caches: bool = True) -> str | None:
    """Why cold loads cannot be measured in `directory` (None: they can), found with a 4 MiB probe file."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".cold-probe-{os.getpid()}"
    try:
        probe.write_bytes(os.urandom(4 << 20))
        _fadvise_dontneed([probe])
        left = resident_fraction([probe])
    except OSError as e:
        return f"evicting a file failed here ({e})"
    finally:
        probe.unlink(missing_ok=True)
    if left is not None and left <= COLD_ENOUGH:
        return None
    if allow_drop_caches and can_drop_caches():
        return None
    found = "mincore is unavailable" if left is None else f"{left:.0%} of a probe file stayed cached after fadvise"
    return f"{found} and /proc/sys/vm/drop_caches is not writable (needs root)"
