"""``python3 -S -m guest_agent.nsremount NSFILE``: every mount of the mount namespace at
NSFILE (a zone's pinned reference, or /proc/PID/ns/mnt) remounted read-only; prints the
number remounted.

The deputy's helper child (deputy_steps.System.remount_namespace): setns(CLONE_NEWNS)
refuses a multithreaded caller, so the agent starts this single-threaded process instead.
It does what the controller's own read-only switch does (hvtsm/zones/cgroup/mounts.py
`make_view_readonly`): each mount as a read-only bind remount keeping its nosuid, nodev,
noexec and atime flags; a mount point that no longer resolves is skipped; any other
failure is an error (status 1), so a zone is never believed read-only while a mount stays
writable. Stdlib only.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys

from guest_agent import mountinfo

CLONE_NEWNS = 0x00020000


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python3 -m guest_agent.nsremount NSFILE", file=sys.stderr)
        return 2
    libc = ctypes.CDLL(None, use_errno=True)
    libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                           ctypes.c_ulong, ctypes.c_void_p]
    try:
        fd = os.open(argv[0], os.O_RDONLY | os.O_CLOEXEC)
        # opened before joining: the zone's /proc belongs to its own PID namespace, where
        # this process has no entry (/proc/self does not resolve there)
        proc_self = os.open("/proc/self", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        print(f"cannot open {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    if libc.setns(fd, CLONE_NEWNS) != 0:
        print(f"cannot join {argv[0]}: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 1
    os.close(fd)
    info = os.open("mountinfo", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc_self)
    with os.fdopen(info, "rb") as f:
        found = mountinfo.parse(f.read())
    count = 0
    for entry in found:
        if entry.fstype == "nsfs":
            continue
        point = entry.point
        if libc.mount(None, point, None, entry.readonly_flags(), None) != 0:
            err = ctypes.get_errno()
            if err in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE):
                continue
            print(f"cannot remount {point.decode(errors='replace')} read-only: "
                  f"{os.strerror(err)}", file=sys.stderr)
            return 1
        count += 1
    print(f"remounted {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
