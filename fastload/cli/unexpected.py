"""The last line of defence of the command line: an exception the library did not turn into a fastload error still
reaches the user as one (what was asked, what was found, what to do), without a traceback unless --debug."""

from __future__ import annotations

import errno

from fastload.errors import FastloadError

# errors a user can fix, told by errno or, from libraries that only keep the OS's text (safetensors), by that text
KNOWN_OS_ERRORS = {
    errno.ENOSPC: ("the disk is full", "free space (or write elsewhere) and run the command again"),
    errno.EDQUOT: ("the disk quota is used up", "free space (or write elsewhere) and run the command again"),
    errno.EROFS: ("the file system is read-only", "write to a folder you can write to"),
    errno.ENAMETOOLONG: ("a file name is too long for the file system", "use a shorter name or path"),
}
KNOWN_TEXTS = {"no space left on device": errno.ENOSPC, "os error 28": errno.ENOSPC,
               "disk quota exceeded": errno.EDQUOT,
               "read-only file system": errno.EROFS, "file name too long": errno.ENAMETOOLONG}


def _known_errno(error: BaseException) -> int | None:
    """The errno of a cause the user can fix, searched along the chain of causes."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in KNOWN_OS_ERRORS:
            return error.errno
        text = str(error).lower()
        for words, number in KNOWN_TEXTS.items():
            if words in text:
                return number
        error = error.__cause__ or error.__context__
    return None


def as_fastload_error(error: Exception, argv: list[str]) -> FastloadError:
    """The fastload error the user sees for `error`, raised while running `fastload ARGV`.

    Args:
        error: what escaped the command.
        argv: the command line, for the message's "asked" part.
    Returns:
        A FastloadError caused by `error` (a full disk, a read-only folder or a name too long say so).
    """
    asked = "fastload " + " ".join(argv)
    asked = asked if len(asked) <= 300 else asked[:300] + "..."
    detail = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    number = _known_errno(error)
    if number is not None:
        what, fix = KNOWN_OS_ERRORS[number]
        found = f"{what} ({detail})"
    else:
        found, fix = detail, "run it again with --debug to see where it failed, and report it if the input is right"
    wrapped = FastloadError(asked, found=found, fix=fix)
    wrapped.__cause__ = error
    return wrapped
