"""Administering a guest through its agent: what the host cannot do from outside (the
guest's loopback, its root's mount flags, a process's limits, cleaning up between two zones
of a pooled guest).
"""

from __future__ import annotations

import pwd
import shlex
import time
import uuid
from typing import Any

from hvtsm.errors import ZoneError
from hvtsm.zones.base import ZoneHandle
from hvtsm.zones.libvirt.guests import Guests

#: a guest's directories every user may write to: a pooled guest's scrub deletes what the
#: workload's user left there, so the next request of the pool finds none of it
SHARED_TMP = ("/tmp", "/var/tmp", "/dev/shm")
#: of those, the ones a pooled guest gets a tmpfs of its own on
PRIVATE_TMP = ("/tmp", "/var/tmp")


class GuestAdmin:
    def __init__(self, guests: Guests) -> None:
        self.guests = guests

    def link_down(self, handle: ZoneHandle[Any], iface: str) -> None:
        self._command(handle, ["ip", "link", "set", iface, "down"])

    def remount_ro(self, handle: ZoneHandle[Any], path: str) -> None:
        self._command(handle, ["mount", "-o", "remount,ro", path])

    def nproc(self, handle: ZoneHandle[Any], pid: int, limit: int) -> None:
        self._command(handle, ["prlimit", f"--pid={pid}", f"--nproc={limit}"], check=False)

    def _command(self, handle: ZoneHandle[Any], argv: list[str], *, check: bool = True,
                 timeout: float = 15.0) -> int | None:
        """Run an administrative command in the guest as root, through the agent."""
        link = self.guests.require_link(handle.state.guest, handle.zone_id)
        remote = link.start(argv, stdout=None, stderr=None)
        status = remote.wait(timeout)
        if check and status != 0:
            raise ZoneError(f"guest command {argv} failed with status {status}",
                            zone_id=handle.zone_id)
        return status

    def scrub(self, guest: str, user: str, scratch: str, *, timeout: float = 30.0) -> float:
        """Between two zones of one guest: kill every process of `user` (what a workload
        left running), check that none survives, delete what a workload of the user made
        in the shared temporary directories (/tmp, /var/tmp, /dev/shm: their entries the
        user owns, with all they hold), and give the next zone an empty `scratch`
        directory. Returns the seconds it took; ZoneError when a process or a file
        survives or the guest does not answer."""
        link = self.guests.link(guest)
        if link is None:
            raise ZoneError(f"no agent link to guest {guest}")
        entry = pwd.getpwnam(user)
        uid, gid = entry.pw_uid, entry.pw_gid
        if uid == 0:
            raise ZoneError("a guest whose workload ran as root cannot be scrubbed for reuse")
        # the user's own entries of the shared directories. A lab guest's /tmp and
        # /var/tmp are the host's (over 9p: slow to walk, and none of a workload's
        # business), so the guest's first scrub, before it served anything, mounts a
        # private tmpfs on each that is not a mount of its own yet; it also lists the
        # user's entries already there as known, and later scrubs leave those alone
        known = f"/run/hvtsm-scrub-known-{uid}"
        private = "; ".join(f"mountpoint -q {d} || mount -t tmpfs -o mode=1777,nosuid,nodev "
                            f"tmpfs {d} || exit 6" for d in PRIVATE_TMP)
        found = (f"find {' '.join(shlex.quote(d) for d in SHARED_TMP)} -mindepth 1 "
                 f"-maxdepth 1 -user {uid} 2>/dev/null")
        made = f"{found} | grep -vxF -f {known}"
        # pkill -U matches the real uid, which a setuid program keeps; a process forked
        # between the kill and the check is caught by the next round
        script = (f"n=0; while pgrep -U {uid} >/dev/null; do n=$((n+1)); "
                  f"[ $n -gt 40 ] && exit 3; pkill -KILL -U {uid}; sleep 0.05; done; "
                  f"[ -e {known} ] || {{ {private}; {found} > {known}; "
                  f"[ -e {known} ] || exit 5; }}; "
                  # each program started costs a TCG guest ~80 ms: the second look only
                  # when there was something to delete
                  f"left=$({made}); if [ -n \"$left\" ]; then "
                  f"printf '%s\\n' \"$left\" | while IFS= read -r p; do rm -rf \"$p\"; done; "
                  f"[ -z \"$({made})\" ] || exit 4; fi; "
                  f"rm -rf {shlex.quote(scratch)} && install -d -m 0700 -o {uid} -g {gid} "
                  f"{shlex.quote(scratch)}")
        t0 = time.monotonic()
        remote = link.start(["/bin/sh", "-c", script], stdout=None, stderr=None,
                            workload_id="scrub-" + uuid.uuid4().hex[:12])
        status = remote.wait(timeout)
        if status != 0:
            raise ZoneError(f"guest {guest}: scrub failed (status {status}): "
                            + {3: "processes of the previous workload survived",
                               4: "files of the previous workload could not be deleted",
                               5: f"could not list the known files of uid {uid}",
                               6: "could not mount a private tmpfs on /tmp or /var/tmp"}
                            .get(status or 0, "the guest did not clean up"))
        return time.monotonic() - t0
