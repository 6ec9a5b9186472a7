"""How a watch begins: the workload's first process, just before its exec, sends a JSON
header (id, profile; beside a cgroup zone also procs_file and oom_file) with its seccomp
listener fd over a SOCK_SEQPACKET socket (seccomp.Installer.install_and_hand_over). In a
guest that is the monitor's own socketpair; beside a cgroup zone, an inherited socket the
zone's launcher writes to (Monitor.attach_socket).

Fail closed: a header that cannot be used closes the listener, so the tree's notified
calls fail (ENOSYS), its first exec included, instead of running unwatched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from guest_agent.profile import Profile, ProfileError

log = logging.getLogger("guest_agent")

MAX_HEADER = 64 * 1024


@dataclass(frozen=True)
class Handover:
    id: str
    profile: Profile
    listener_fd: int
    procs_file: str | None = None
    oom_file: str | None = None


def _optional_str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def receive(sock: socket.socket) -> Handover | None:
    """The next watch handed over on `sock`, or None (nothing usable: whatever came was
    logged and its fds closed). EOFError when the socket gave nothing at all (its peer
    closed it, or it failed)."""
    try:
        msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_HEADER, 4, socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as e:
        log.warning("watch socket: %s", e)
        msg, fds = b"", []
    if not msg and not fds:
        raise EOFError
    for extra in fds[1:]:
        os.close(extra)
    if not fds:
        log.warning("watch header without a listener fd: %r", msg[:200])
        return None
    try:
        header = json.loads(msg.decode("utf-8"))
        wid = header["id"]
        if not isinstance(wid, str) or not wid:
            raise ValueError("id must be a non-empty string")
        profile = Profile.from_dict(header.get("profile") or {})
    except (ValueError, KeyError, TypeError, AttributeError, ProfileError) as e:
        log.warning("bad watch header (%s): %r", e, msg[:200])
        with contextlib.suppress(OSError):
            os.close(fds[0])
        return None
    return Handover(wid, profile, fds[0], _optional_str(header.get("procs_file")),
                    _optional_str(header.get("oom_file")))


__all__ = ["MAX_HEADER", "Handover", "receive"]
