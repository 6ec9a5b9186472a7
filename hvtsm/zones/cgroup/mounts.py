"""The zone's mount namespace: private, without other namespaces' handles, read-only on
demand; and the reference that keeps it reachable for a later read-only switch.

The functions that run in a forked child (`enter_private_mount_ns`, `make_view_readonly`)
only parse /proc/self/mountinfo and call mount(2): no imports, no locks, no threads.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from guest_agent import mountflags
from guest_agent.mountinfo import MountEntry
from guest_agent.mountinfo import parse as parse_mountinfo
from hvtsm.zones.cgroup import libc

#: bind mounts of zones' mount namespaces, one file per zone, named by zone id
NS_REF_DIR = Path("/run/hvtsm/ns")

def read_mountinfo(path: str = "/proc/self/mountinfo", *,
                   proc_dir: int | None = None) -> list[MountEntry]:
    """The caller's mounts. `proc_dir`: an fd of the caller's /proc/self opened earlier,
    for a caller that has since joined a zone's mount namespace, whose /proc belongs to
    the zone's PID namespace and so has no entry for the caller."""
    if proc_dir is not None:
        return parse_mountinfo(read_bytes("mountinfo", dir_fd=proc_dir))
    return parse_mountinfo(read_bytes(path))


def read_bytes(path: str | bytes, *, dir_fd: int | None = None) -> bytes:
    """A whole file, with plain os calls: this runs in forked children of a multithreaded
    controller."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def enter_private_mount_ns() -> None:
    """Give the calling (single-threaded) process its own mount namespace, cut off from
    the host's: nothing mounted here propagates back, nothing the host mounts arrives."""
    libc.unshare(libc.CLONE_NEWNS)
    libc.mount(None, b"/", None, mountflags.MS_REC | mountflags.MS_PRIVATE)
    # the copies of `ip netns` handles and other zones' mount references would keep those
    # namespaces alive (and their veths on the host) as long as this zone lives
    for entry in read_mountinfo():
        if entry.fstype == "nsfs":
            with contextlib.suppress(OSError):
                libc.umount2(entry.point, libc.MNT_DETACH)


def make_view_readonly(*, proc_dir: int | None = None) -> int:
    """Remount every mount of the caller's mount namespace read-only; returns how many.
    A mount point that no longer resolves (shadowed or gone) is skipped; any other
    failure raises, so a zone is never believed read-only while a mount stays writable.
    `proc_dir`: as read_mountinfo's."""
    count = 0
    for entry in read_mountinfo(proc_dir=proc_dir):
        if entry.fstype == "nsfs":
            continue
        try:
            libc.mount(None, entry.point, None, entry.readonly_flags())
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE):
                continue
            raise
        count += 1
    return count


def all_readonly(mountinfo: str) -> bool:
    """Whether every mount `make_view_readonly` would remount in the namespace that
    `mountinfo` (a /proc/<pid>/mountinfo) shows is read-only already. False when it cannot
    be read: the remount then runs and says what is wrong."""
    try:
        entries = read_mountinfo(mountinfo)
    except OSError:
        return False
    return readonly_view(entries)


def readonly_view(entries: list[MountEntry]) -> bool:
    """Whether the mounts a process can reach, nsfs handles aside (never remounted), are
    all read-only. A mount stacked over another on the same point (a second /dev/pts)
    hides it: the remount by path reaches only the top one, and so can the zone."""
    covered = {(e.point, e.parent_id) for e in entries}
    seen = [e for e in entries if e.fstype != "nsfs" and (e.point, e.mount_id) not in covered]
    return bool(seen) and all("ro" in e.options for e in seen)


def _is_mount_point(path: Path) -> bool:
    target = os.fsencode(path)
    return any(e.point == target for e in read_mountinfo())


def prepare_ref_dir() -> None:
    """Make NS_REF_DIR a private mount: a namespace handle mounted on a shared mount
    would propagate into peer namespaces."""
    NS_REF_DIR.mkdir(parents=True, exist_ok=True)
    if not _is_mount_point(NS_REF_DIR):
        raw = os.fsencode(NS_REF_DIR)
        libc.mount(raw, raw, None, mountflags.MS_BIND)
    libc.mount(None, os.fsencode(NS_REF_DIR), None, mountflags.MS_PRIVATE)


def ref_path(zone_id: str) -> Path:
    return NS_REF_DIR / zone_id


def bind_ns_ref(pid: int, zone_id: str) -> Path | None:
    """Pin the mount namespace of `pid` at ref_path(zone_id); None when `pid` is gone."""
    path = ref_path(zone_id)
    path.touch()
    try:
        libc.mount(os.fsencode(f"/proc/{pid}/ns/mnt"), os.fsencode(path), None, mountflags.MS_BIND)
    except OSError:
        path.unlink(missing_ok=True)
        return None
    return path


def drop_ns_ref(zone_id: str) -> list[str]:
    path = ref_path(zone_id)
    if not path.exists():
        return []
    with contextlib.suppress(OSError):
        libc.umount2(os.fsencode(path), libc.MNT_DETACH)
    path.unlink(missing_ok=True)
    return [f"mount namespace reference {path}"]


def would_drop_ns_ref(zone_id: str) -> list[str]:
    path = ref_path(zone_id)
    return [f"mount namespace reference {path}"] if path.exists() else []


def ref_zone_ids() -> set[str]:
    try:
        return {e.name for e in os.scandir(NS_REF_DIR) if e.is_file()}
    except FileNotFoundError:
        return set()
