"""Administering a guest through its agent: what the host cannot do from outside (the
guest's loopback, its root's mount flags, a process's limits, cleaning up between two zones
of a pooled guest).
"""

from __future__ import annotations

import logging
import pwd
import time
from typing import Any

from hvtsm.errors import ZoneError
from hvtsm.monitor.link import AgentLink
from hvtsm.zones.base import ZoneHandle
from hvtsm.zones.libvirt.guests import Guests

log = logging.getLogger(__name__)

#: how long one administration request may take (a TCG guest is slow)
REQUEST_TIMEOUT = 15.0

#: a guest's directories every user may write to: a pooled guest's scrub deletes what the
#: workload's user left there, so the next request of the pool finds none of it
SHARED_TMP = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")
#: of those, the ones a pooled guest gets a tmpfs of its own on
PRIVATE_TMP = ("/tmp", "/var/tmp")


class GuestAdmin:
    """Typed administration requests to a guest's agent (guest_agent/admin.py carries them
    out, as root in the guest): no shell program, no exit codes to decode."""

    def __init__(self, guests: Guests) -> None:
        self.guests = guests

    def link_down(self, handle: ZoneHandle[Any], iface: str) -> bool:
        """Whether the interface was up (False: it was down already)."""
        result = self._link(handle).admin("link_down", timeout=REQUEST_TIMEOUT, iface=iface)
        return result.get("was_up") is not False

    def remount_ro(self, handle: ZoneHandle[Any], path: str) -> bool:
        """Whether the mount was read-only already."""
        result = self._link(handle).admin("remount_ro", timeout=REQUEST_TIMEOUT, path=path)
        return result.get("was_ro") is True

    def nproc(self, handle: ZoneHandle[Any], pid: int, limit: int) -> tuple[int, int] | None:
        """Lower the process's RLIMIT_NPROC to `limit` (the agent never raises it); the
        (soft, hard) it had before (-1: unlimited), None when it could not be set."""
        try:
            result = self._link(handle).admin("nproc", timeout=REQUEST_TIMEOUT, pid=pid,
                                              limit=limit)
        except ZoneError as exc:
            # the workload may have ended since: the limit is the guest kernel's business
            # then, not a failure of the phase
            log.info("zone %s: RLIMIT_NPROC not set: %s", handle.zone_id, exc)
            return None
        previous = result.get("previous")
        if (isinstance(previous, list) and len(previous) == 2
                and all(isinstance(p, int) and not isinstance(p, bool) for p in previous)):
            return previous[0], previous[1]
        return None

    def _link(self, handle: ZoneHandle[Any]) -> AgentLink:
        return self.guests.require_link(handle.state.guest, handle.zone_id)

    def scrub(self, guest: str, user: str, scratch: str, *, timeout: float = 30.0) -> float:
        """Between two zones of one guest: kill every process of `user` (what a workload
        left running), check that none survives, delete what a workload of the user made
        in the shared temporary directories (/tmp, /var/tmp, /dev/shm: their entries the
        user owns, with all they hold), and give the next zone an empty `scratch`
        directory. A lab guest's /tmp and /var/tmp are the host's (over 9p), so the guest's
        first scrub, before it served anything, mounts a private tmpfs on each, and the
        user's entries already present then are left alone later. Returns the seconds it
        took; ZoneError naming what survived, or that the guest did not answer."""
        link = self.guests.link(guest)
        if link is None:
            raise ZoneError(f"no agent link to guest {guest}")
        entry = pwd.getpwnam(user)
        if entry.pw_uid == 0:
            raise ZoneError("a guest whose workload ran as root cannot be scrubbed for reuse")
        t0 = time.monotonic()
        try:
            link.admin("scrub", timeout=timeout, uid=entry.pw_uid, gid=entry.pw_gid,
                       scratch=scratch, shared=list(SHARED_TMP), private=list(PRIVATE_TMP))
        except ZoneError as exc:
            raise ZoneError(f"guest {guest}: scrub failed: {exc}") from None
        return time.monotonic() - t0
