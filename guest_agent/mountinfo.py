"""/proc/PID/mountinfo read as typed entries, for the agent (a guest's scrub, the deputy's
read-only switch) and the host (a zone's view, its read-only switch) alike. Stdlib only."""

from __future__ import annotations

from dataclasses import dataclass

from guest_agent.mountflags import (
    MS_BIND,
    MS_NOATIME,
    MS_NODEV,
    MS_NODIRATIME,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_RELATIME,
    MS_REMOUNT,
    MS_STRICTATIME,
)

#: per-mount options a read-only remount keeps (changing them needs more privilege than a
#: remount, and would loosen or alter what the mount's owner chose)
KEPT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
              "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}


@dataclass(frozen=True)
class MountEntry:
    point: bytes
    options: frozenset[str]
    fstype: str
    #: the file system's own options, in mountinfo's order (a cgroup v1 hierarchy's
    #: controllers)
    super_options: tuple[str, ...] = ()
    mount_id: int = 0
    parent_id: int = 0

    def readonly_flags(self) -> int:
        """mount(2) flags that make this mount read-only and change nothing else."""
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for option in self.options:
            flags |= KEPT_FLAGS.get(option, 0)
        if not self.options & {"noatime", "relatime"}:
            # no atime word in mountinfo means strictatime; without the flag the kernel
            # would pick its default (relatime) and refuse the change on locked mounts
            flags |= MS_STRICTATIME
        return flags


def unescape(raw: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash as \\ooo."""
    if b"\\" not in raw:
        return raw
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 4 <= len(raw) and raw[i + 1:i + 4].isdigit():
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return bytes(out)


def parse(text: bytes) -> list[MountEntry]:
    """Every well-formed line of a mountinfo file; any other line is passed over."""
    entries: list[MountEntry] = []
    for line in text.splitlines():
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-", 6)
            entries.append(MountEntry(
                point=unescape(fields[4]),
                options=frozenset(fields[5].decode().split(",")),
                fstype=fields[sep + 1].decode(),
                super_options=tuple(fields[sep + 3].decode().split(","))
                if len(fields) > sep + 3 else (),
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
            ))
        except (ValueError, IndexError):
            continue
    return entries
