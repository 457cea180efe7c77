"""Writing a folder whole or not at all: fastload's one way to put a multi-file result on disk, and its one rule for
cleaning up after a writer that died.

A result is written into a temporary folder `.{name}.tmp-{pid}-{tag}` beside its destination (or in a staging
folder) holding an ownership marker, `.fastload-tmp` (pid, host, time), then renamed into place. Replacing an
existing folder renames it aside as `.{name}.old-{pid}-{tag}`, renames the new one in, moves back what the new one
does not replace (checkpoint-N folders, the user's own files) and deletes only what was replaced. A finished folder
carries `.fastload-written` (its kind and the names fastload wrote there): only those are ever overwritten.

Clean-up deletes only folders carrying the marker whose writer is gone (its pid no longer runs on this host) or
that are very old; a folder moved aside is only ever put back, never deleted unseen.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from fastload._log import logger
from fastload.errors import InvalidOption, SaveError

MARKER = ".fastload-tmp"
RECORD = ".fastload-written"
STALE_SECONDS = 6 * 3600
# a user's own document of this kind wins over ours (peft writes a model card README.md): ours is left out
USER_DOC_SUFFIXES = (".md", ".txt")
# tests only: {"point": ..., "dest": ..., "ready": ...} stops the writer there so a real SIGKILL lands mid-write
PAUSE_ENV = "FASTLOAD_TEST_PAUSE_AT"
# a save from before RECORD existed: the files this save writes again and its weights count as fastload's (a stale
# shard kept beside new ones would be loaded); everything else there (a user's notes, checkpoint-N) is kept
LEGACY = "\0legacy"
LEGACY_STALE = (".safetensors", ".bin", ".index.json")
LEFTOVER_NAME = re.compile(r"^\.(?P<dest>.+)\.(?P<role>tmp|old|del)-(?P<pid>\d+)-(?P<tag>[0-9a-f]{8})$")


# -- a full disk, however it is reported -------------------------------------------------------------------------

# how libraries report a failed write without an OSError: safetensors (Rust) "No space left on device (os error 28)",
# torch's zip writer "unexpected pos ..." / "PytorchStreamWriter failed writing file"
_WRITE_FAILED = ("unexpected pos", "failed writing file", "file write failed", "write failed")
NEARLY_FULL_BYTES = 64 << 20


def disk_full_error(error: BaseException, folder: str | os.PathLike) -> OSError | None:
    """The OSError(ENOSPC) behind `error` when a write failed because the disk is full, else None. safetensors and
    torch raise their own types for it: the errno is found in the cause chain or the message, and a write failure
    that names none counts as full when the disk holding `folder` has almost no space left."""
    seen: BaseException | None = error
    write_failed = False
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return seen
        text = str(seen)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write_failed = write_failed or any(w in text for w in _WRITE_FAILED)
        seen = seen.__cause__ or seen.__context__
    if write_failed and _free_bytes(Path(folder)) < NEARLY_FULL_BYTES:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def _free_bytes(folder: Path) -> int:
    for candidate in (folder, *folder.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return 1 << 62


# -- ownership ----------------------------------------------------------------------------------------------------

def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs (another user's counts): its temporary files are still being written."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_marker(folder: Path, role: str) -> None:
    """Mark `folder` as fastload's own temporary folder, naming the writer that may be waited for."""
    mark = {"writer": "fastload", "role": role, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
    (folder / MARKER).write_text(json.dumps(mark))


def read_marker(folder: Path) -> dict | None:
    """The marker's content, or None when the folder carries none (or a damaged one): then it is not provably ours."""
    try:
        mark = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    ok = isinstance(mark, dict) and mark.get("writer") == "fastload" and isinstance(mark.get("pid"), int)
    return mark if ok and isinstance(mark.get("time"), (int, float)) else None


def writer_gone(mark: dict) -> bool:
    """A marked folder may be removed once its writer died on this host, or once it is very old (any host)."""
    if time.time() - mark["time"] > STALE_SECONDS:
        return True
    return mark.get("host") == socket.gethostname() and not pid_alive(mark["pid"])


def leftover_name(dest: Path, role: str, staging: Path | None = None) -> Path:
    """The one temporary-name scheme: `.{name}.{tmp|old|del}-{pid}-{tag}` in the staging folder or beside dest."""
    return (staging or dest.parent) / f".{dest.name}.{role}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


# -- refusing a destination that is a source ----------------------------------------------------------------------

def refuse_source(dest: str | os.PathLike, sources: Iterable, asked: str, found: str | None = None) -> None:
    """Raise InvalidOption when `dest` is one of `sources`, lies inside one or contains one (real paths compared).

    Args:
        dest: the folder about to be written.
        sources: paths (or repo ids, None: skipped) the same operation reads from.
        asked: what was asked, for the error message.
        found: what the message says was found (default: names both paths).
    Raises:
        InvalidOption: writing there would replace or nest into what is being read.
    """
    target = Path(os.path.realpath(Path(dest).expanduser()))
    for source in sources:
        if not source or not Path(str(source)).expanduser().exists():
            continue
        src = Path(os.path.realpath(Path(str(source)).expanduser()))
        if target == src or src in target.parents or target in src.parents:
            raise InvalidOption(asked, found=found or f"{target} is the source it reads from, or inside or around it "
                                f"({src}); writing there would destroy the original",
                                fix="choose another folder, outside the source")


def check_writable(dest: str | os.PathLike, asked: str) -> None:
    """Refuse, before any long work, a destination folder that cannot be written: a file, or a folder (or the
    nearest existing folder above it) on a read-only file system or without write permission.

    access(2) answers for the mount too (a read-only bind mount refuses even root), so nothing is written to find
    out: no probe file appears in the user's folder.

    Args:
        dest: the folder a command will write (it may not exist yet).
        asked: what was asked, for the error message.
    Raises:
        InvalidOption: dest is an existing file.
        SaveError: nothing can be written there (its message names the folder and why).
    """
    target = Path(dest).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise InvalidOption(asked, found=f"{target} is a file, not a folder", fix="choose a new or existing folder")
    folder = next(p for p in (target, *target.parents) if p.is_dir())
    if os.access(folder, os.W_OK | os.X_OK):
        return
    read_only = hasattr(os, "statvfs") and bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    why = "its file system is read-only" if read_only else "you have no permission to write there"
    raise SaveError(asked, found=f"{folder} cannot be written: {why}",
                    fix="choose a folder you can write to, or make this one writable")


# -- writing ------------------------------------------------------------------------------------------------------

def _remove_dead_writers_files(dest: Path) -> None:
    """Temporary files of `dest` left by a writer that was killed: the scheme's own names, files only, whose pid no
    longer runs here and untouched for a minute (a name alone does not say which host wrote it)."""
    for path in dest.parent.glob(f".{glob.escape(dest.name)}.tmp-*"):
        found = LEFTOVER_NAME.match(path.name)
        ours = found is not None and found["dest"] == dest.name and found["role"] == "tmp"
        with contextlib.suppress(OSError):
            if (ours and path.is_file() and not path.is_symlink() and not pid_alive(int(found["pid"]))
                    and time.time() - path.stat().st_mtime > 60):
                path.unlink()


@contextlib.contextmanager
def scratch_folder(near: str | os.PathLike) -> Iterator[Path]:
    """A marked temporary folder beside `near` for intermediate files (a merge before its GGUF, an F16 before its
    k-quant), removed when the block ends; if the process is killed, the next clean-up there removes it.

    Yields:
        The empty folder.
    """
    near = Path(near).expanduser().absolute()
    tmp = leftover_name(near, "tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        write_marker(tmp, "tmp")
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of the file `dest` (`.{name}.tmp-{pid}-{tag}`, the folders' naming); when the block
    ends it is synced and renamed over `dest` in one step, on any error (Ctrl-C included) it is removed: a reader
    sees the old file or the new one, never part of one.

    Args:
        dest: the file to write; its folder is created if missing.
    Yields:
        The path to write the new content to.
    Raises:
        OSError: what writing, syncing or renaming raised (dest is then unchanged).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers_files(dest)
    tmp = leftover_name(dest, "tmp")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike, kind: str, marker_file: str | None = None, into_existing: bool = False,
                  staging: Path | None = None, record: bool = True) -> Iterator[Path]:
    """Yield a marked temporary folder; when the block ends it replaces `dest` whole, on any error it is removed.

    Args:
        dest: the folder to write.
        kind: what is written ("adapter", "model", ...): a folder fastload recorded as another kind is refused.
        marker_file: a file whose presence marks a previous save from before `.fastload-written` existed: its
            top-level files then count as fastload's.
        into_existing: write into a non-empty folder fastload did not write (`fastload train --out`), keeping
            everything there; otherwise such a folder is refused.
        staging: where the temporary folder goes (default: beside dest); same file system as dest.
        record: write `.fastload-written` into the result (off for store entries, whose manifest lists the files).
    Yields:
        The temporary folder to write into.
    Raises:
        InvalidOption: dest is a file, a folder of another kind, a non-empty folder that is no previous save, or
            the result would overwrite files fastload did not write (nothing is written then).
        OSError: the disk is full, no permission (the previous content of dest is unchanged).
    """
    dest = Path(dest).expanduser().absolute()
    for where in {dest.parent, staging or dest.parent}:
        if where.is_dir():
            clean_leftovers(where, dest)
    ours = owned_names(dest, kind, marker_file, into_existing)
    tmp = leftover_name(dest, "tmp", staging)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        write_marker(tmp, "tmp")
        yield tmp
        _pause("written", dest)
        if LEGACY in ours:
            ours = (ours - {LEGACY}) | {p.name for p in tmp.iterdir()}
        _leave_out_user_files(tmp, dest, ours)
        if record:
            names = sorted(p.name for p in tmp.iterdir() if p.name not in (MARKER, RECORD))
            (tmp / RECORD).write_text(json.dumps({"writer": "fastload", "kind": kind, "files": names}))
        _fsync_tree(tmp)
        _swap_in(tmp, dest, ours, staging)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def owned_names(dest: Path, kind: str, marker_file: str | None, into_existing: bool) -> set[str]:
    """The top-level names in `dest` fastload wrote (and may overwrite or delete); raises if dest may not be written."""
    if not dest.exists():
        return set()
    if not dest.is_dir():
        raise InvalidOption(f"Saving to {dest}", found="a file with that name", fix="choose another path")
    names = {p.name for p in dest.iterdir()} - {MARKER}
    if not names:
        return set()
    recorded = _read_record(dest)
    if recorded is not None:
        if recorded["kind"] != kind:
            raise InvalidOption(f"Saving a {kind} to {dest}", found=f"it holds a {recorded['kind']} fastload wrote",
                                fix="choose another folder")
        return set(recorded["files"]) & names
    if marker_file and (dest / marker_file).is_file():  # a save from before the record existed
        return {LEGACY} | {n for n in names if (dest / n).is_file() and n.endswith(LEGACY_STALE)}
    if into_existing:
        return set()
    raise InvalidOption(f"Saving to {dest}", found=f"a non-empty folder without {marker_file or RECORD}: not a "
                        "previous save, so it is not replaced", fix="choose a new or empty folder")


def _read_record(folder: Path) -> dict | None:
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("kind"), str) and isinstance(record.get("files"), list)
    return record if ok and all(isinstance(n, str) for n in record["files"]) else None


def _leave_out_user_files(tmp: Path, dest: Path, ours: set[str]) -> None:
    """Never overwrite a file fastload did not write: a user's document wins over ours, anything else is refused."""
    if not dest.is_dir():
        return
    clashes = sorted(p.name for p in tmp.iterdir() if p.name not in (MARKER, RECORD) and p.name not in ours
                     and (dest / p.name).exists())
    kept = [n for n in clashes if n.endswith(USER_DOC_SUFFIXES) and (dest / n).is_file()]
    refused = [n for n in clashes if n not in kept]
    if refused:
        raise InvalidOption(f"Saving to {dest}", found=f"it holds files fastload did not write, which this save would "
                            f"overwrite: {refused}", fix="move them away, or save to another folder")
    for name in kept:
        os.remove(tmp / name)
        logger.warning("kept the %s already there (yours, or a trainer's model card): fastload's own %s was not "
                       "written", dest / name, name)


def _swap_in(tmp: Path, dest: Path, ours: set[str], staging: Path | None) -> None:
    """Rename tmp to dest; an existing dest is moved aside first, then what the new one does not replace comes back."""
    if not dest.exists():
        os.rename(tmp, dest)
        _unmark(dest)
        return
    old = leftover_name(dest, "old", staging)
    os.rename(dest, old)
    write_marker(old, "old")
    _pause("moved-aside", dest)
    os.rename(tmp, dest)
    _pause("swapped", dest)
    _move_back(old, dest, stale=ours)
    _unmark(dest)


def _move_back(old: Path, dest: Path, stale: set[str]) -> None:
    """Put back everything of the previous folder the new one did not replace, except files fastload wrote there
    before (stale: a previous save's extra shard); then delete the rest, which is only what was replaced."""
    for entry in sorted(old.iterdir()):
        if entry.name in (MARKER, RECORD) or entry.name in stale or (dest / entry.name).exists():
            continue
        os.rename(entry, dest / entry.name)
    shutil.rmtree(old, ignore_errors=True)


def _unmark(folder: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(folder / MARKER)


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def discard(path: Path, staging: Path | None = None) -> bool:
    """Move `path` aside (so no reader sees it half-deleted), mark it, delete it; False when it was already gone."""
    trash = leftover_name(path, "del", staging)
    trash.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return False
    write_marker(trash, "del")
    shutil.rmtree(trash, ignore_errors=True)
    return True


# -- cleaning up after a writer that died -------------------------------------------------------------------------

def clean_leftovers(where: Path, dest: Path | None = None) -> list[Path]:
    """Remove the marked temporary folders in `where` whose writer is gone; put back a folder a dead writer had
    moved aside. With `dest`, only that destination's leftovers. Anything without our marker stays untouched.

    Returns:
        The leftovers removed or put back.
    """
    pattern = f".{glob.escape(dest.name)}.*" if dest is not None else ".*"
    done = []
    for leftover in sorted(where.glob(pattern)):
        m = LEFTOVER_NAME.match(leftover.name)
        if m is None or not leftover.is_dir() or (dest is not None and m["dest"] != dest.name):
            continue
        mark = read_marker(leftover)
        if m["role"] == "old" and dest is not None:
            if _put_back(leftover, dest, mark, int(m["pid"])):
                done.append(leftover)
        elif m["role"] != "old" and mark is not None and writer_gone(mark):
            shutil.rmtree(leftover, ignore_errors=True)
            done.append(leftover)
        elif m["role"] == "tmp" and mark is None and _unmarked_and_empty(leftover, int(m["pid"])):
            shutil.rmtree(leftover, ignore_errors=True)
            done.append(leftover)
    return done


def put_back_if_moved_aside(dest: Path) -> bool:
    """A missing `dest` whose previous folder a killed save had moved aside (and not yet replaced) is put back, so a
    load right after the kill finds the previous result; True when it did. Nothing is touched while the writer runs."""
    if dest.exists() or not dest.parent.is_dir():
        return False
    with contextlib.suppress(OSError):
        clean_leftovers(dest.parent, dest)
    return dest.exists()


def _unmarked_and_empty(folder: Path, pid: int) -> bool:
    """A writer killed between creating its temporary folder and marking it leaves it empty (or with a cut marker):
    nothing in it can be anyone's, so once that pid is gone it is removed like a marked one."""
    try:
        return not pid_alive(pid) and all(p.name == MARKER for p in folder.iterdir())
    except OSError:
        return False


def _put_back(old: Path, dest: Path, mark: dict | None, pid: int) -> bool:
    """A previous folder a killed writer had moved aside: renamed back when dest is missing; when the new folder
    is already in place, what it did not replace is moved back into it and the replaced rest deleted."""
    if (mark is None and pid_alive(pid)) or (mark is not None and not writer_gone(mark)):
        return False
    if not dest.exists():
        os.rename(old, dest)
        _unmark(dest)
        logger.warning("put back %s: a save killed mid-way had moved it aside", dest)
        return True
    if mark is None:  # not provably ours to merge: left for the user
        logger.warning("%s holds what a killed save moved aside from %s; left as it is", old, dest)
        return False
    record = _read_record(old)
    _move_back(old, dest, stale=set(record["files"]) if record else set())
    _unmark(dest)
    return True


def _pause(point: str, dest: Path) -> None:
    """Tests only: stop here (writing the ready file) when PAUSE_ENV names this point and destination."""
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    wanted = json.loads(spec)
    if wanted.get("point") == point and Path(wanted.get("dest", "")).absolute() == dest:
        Path(wanted["ready"]).write_text(point)
        time.sleep(600)
