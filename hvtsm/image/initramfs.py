"""A deterministic newc cpio writer (the format the Linux kernel unpacks as an initramfs).

Pure Python: no `cpio` binary, no root needed for device nodes (a node is only a header),
and the same entries always give the same bytes (fixed mtime, inode numbers in order of
writing), so an initramfs can be content-addressed. `read_newc` is the matching reader, for
tests and for looking inside a built image.

Format (see the kernel's Documentation/driver-api/early-userspace/buffer-format.rst): each
entry is a 110-byte ASCII header (magic `070701` and 13 eight-digit hex fields), the NUL
terminated name padded to a multiple of 4, then the data padded to a multiple of 4. The
archive ends with an entry named `TRAILER!!!`.
"""

from __future__ import annotations

import gzip
import io
import stat
from dataclasses import dataclass
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_HEADER_LEN = 110


@dataclass(frozen=True)
class CpioEntry:
    """One member of a newc archive, as `read_newc` returns it."""

    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    rdev: tuple[int, int] = (0, 0)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_char_device(self) -> bool:
        return stat.S_ISCHR(self.mode)


def _pad(length: int) -> bytes:
    return b"\0" * ((4 - length % 4) % 4)


def _clean(path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"cpio: bad member path {path!r}")
    return "/".join(parts)


class CpioWriter:
    """Write a newc archive entry by entry; parent directories are added as needed.

    Every entry gets uid/gid 0 and the same `mtime`; a path may be written only once.
    """

    def __init__(self, stream: BinaryIO, *, mtime: int = 0) -> None:
        self._out = stream
        self._mtime = mtime
        self._ino = 0
        self._names: set[str] = set()
        self._dirs: set[str] = set()
        self._closed = False

    # -- entries ----------------------------------------------------------------------------
    def directory(self, path: str, mode: int = 0o755) -> None:
        name = _clean(path)
        if name in self._dirs:
            return
        self._parents(name)
        self._entry(name, stat.S_IFDIR | (mode & 0o7777), b"", nlink=2)
        self._dirs.add(name)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        name = _clean(path)
        self._parents(name)
        self._entry(name, stat.S_IFREG | (mode & 0o7777), data)

    def symlink(self, path: str, target: str) -> None:
        name = _clean(path)
        self._parents(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        name = _clean(path)
        self._parents(name)
        self._entry(name, stat.S_IFCHR | (mode & 0o7777), b"", rdev=(major, minor))

    def close(self) -> None:
        """Write the trailer (the stream itself stays open)."""
        if not self._closed:
            self._header(TRAILER, 0, 0, nlink=1, ino=0)
            self._closed = True

    def __contains__(self, path: str) -> bool:
        return _clean(path) in self._names

    # -- internals --------------------------------------------------------------------------
    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.directory("/".join(parts[:i]))

    def _entry(self, name: str, mode: int, data: bytes, *, nlink: int = 1,
               rdev: tuple[int, int] = (0, 0)) -> None:
        if self._closed:
            raise ValueError("cpio: archive already closed")
        if name in self._names:
            raise ValueError(f"cpio: duplicate member {name!r}")
        self._names.add(name)
        self._ino += 1
        self._header(name, mode, len(data), nlink=nlink, ino=self._ino, rdev=rdev)
        self._out.write(data)
        self._out.write(_pad(len(data)))

    def _header(self, name: str, mode: int, size: int, *, nlink: int, ino: int,
                rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, self._mtime, size, 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        header = MAGIC + b"".join(b"%08X" % f for f in fields)
        self._out.write(header)
        self._out.write(encoded)
        self._out.write(_pad(_HEADER_LEN + len(encoded)))


def read_newc(data: bytes) -> list[CpioEntry]:
    """Parse a (possibly gzip-compressed) newc archive up to its trailer."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        if data[pos:pos + 6] != MAGIC:
            raise ValueError(f"cpio: bad magic at offset {pos}")
        f = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        _ino, mode, uid, gid, _nlink, mtime, size, _maj, _min, rmaj, rmin, namesize, _c = f
        pos += _HEADER_LEN
        name = data[pos:pos + namesize - 1].decode()
        pos += namesize
        pos += len(_pad(_HEADER_LEN + namesize))
        if name == TRAILER:
            return entries
        body = data[pos:pos + size]
        pos += size + len(_pad(size))
        entries.append(CpioEntry(name=name, mode=mode, data=body, uid=uid, gid=gid,
                                 mtime=mtime, rdev=(rmaj, rmin)))


def gzip_bytes(data: bytes, *, level: int = 6) -> bytes:
    """gzip with a zero timestamp and no file name, so equal input gives equal output."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=level, mtime=0, filename="") as gz:
        gz.write(data)
    return buf.getvalue()
