"""Reading a file a user names (a policy, a manifest, a program): a regular file of a
bounded size, or a clear refusal, never a hang or an unbounded read.

A FIFO would block the open until someone writes, /dev/zero never ends, a directory reads
as an error only after the open: each is refused from its stat, before anything is read,
and the open itself cannot block (O_NONBLOCK) should the path change in between.
"""

from __future__ import annotations

import os
import stat

from hvtsm.units import format_size

_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


class FileRefused(ValueError):
    """A file that is not a regular file or is too large; the text says which, without the
    file's name (the caller's error names the file)."""


def _check(st: os.stat_result, limit: int, what: str) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise FileRefused(f"is a directory; name {what}")
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise FileRefused(f"is {kind}, not a regular file; name {what}")
    if st.st_size > limit:
        raise FileRefused(f"is {format_size(st.st_size)} ({st.st_size} bytes); {what} may be "
                          f"at most {format_size(limit)}")


def open_regular(path: str | os.PathLike[str], limit: int, *,
                 what: str = "a regular file") -> int:
    """A read-only descriptor of `path` (the caller closes it); FileRefused when it is not
    a regular file of at most `limit` bytes, OSError when it cannot be opened."""
    _check(os.stat(path), limit, what)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        _check(os.fstat(fd), limit, what)  # the path may name something else by now
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_fd(fd: int, limit: int, *, what: str = "a regular file") -> bytes:
    """The rest of `fd`, at most `limit` bytes (a file that grows past it is refused)."""
    chunks: list[bytes] = []
    size = 0
    while chunk := os.read(fd, min(1 << 20, limit + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise FileRefused(f"grew past {format_size(limit)} while it was read; {what} "
                              f"may be at most {format_size(limit)}")
    return b"".join(chunks)


def read_regular(path: str | os.PathLike[str], limit: int, *,
                 what: str = "a regular file") -> bytes:
    """The bytes of `path`, a regular file of at most `limit` bytes; FileRefused or
    OSError otherwise."""
    fd = open_regular(path, limit, what=what)
    try:
        return read_fd(fd, limit, what=what)
    finally:
        os.close(fd)


def read_tail(path: str | os.PathLike[str], limit: int) -> bytes:
    """The last `limit` bytes of a log file, however long it grew (OSError as for open)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            f.seek(size - limit)
        return f.read(limit)
