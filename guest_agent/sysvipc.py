"""System V IPC objects (shared memory, message queues, semaphore sets) a user left behind.

They belong to the IPC namespace, not to any file or process: a segment a workload made
outlives it, and the next workload of the same user in the same guest could attach it. A
cgroup zone has an IPC namespace of its own (gone with it); a pooled guest serves zone
after zone in one namespace, so its scrub removes the user's objects
(guest_agent/admin.py). Stdlib only (ctypes for the *ctl calls).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from enum import Enum

IPC_RMID = 0


class Kind(Enum):
    SHM = "shm"
    MSG = "msg"
    SEM = "sem"


@dataclass(frozen=True)
class IpcObject:
    kind: Kind
    ident: int
    uid: int
    cuid: int


def _parse(kind: Kind, text: str) -> list[IpcObject]:
    lines = text.splitlines()
    if not lines:
        return []
    header = lines[0].split()
    id_col = header.index({Kind.SHM: "shmid", Kind.MSG: "msqid", Kind.SEM: "semid"}[kind])
    uid_col, cuid_col = header.index("uid"), header.index("cuid")
    out = []
    for line in lines[1:]:
        fields = line.split()
        if len(fields) > max(id_col, uid_col, cuid_col):
            out.append(IpcObject(kind, int(fields[id_col]), int(fields[uid_col]),
                                 int(fields[cuid_col])))
    return out


def objects_of(uid: int, proc: str = "/proc") -> list[IpcObject]:
    """The objects `uid` owns or made."""
    out: list[IpcObject] = []
    for kind in Kind:
        try:
            with open(os.path.join(proc, "sysvipc", kind.value)) as f:
                text = f.read()
        except OSError:
            continue  # a kernel without System V IPC: nothing to leave behind
        out += [o for o in _parse(kind, text) if uid in (o.uid, o.cuid)]
    return out


_libc: ctypes.CDLL | None = None


def remove(obj: IpcObject) -> None:
    """IPC_RMID; an object already gone is no failure."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    call = {Kind.SHM: _libc.shmctl, Kind.MSG: _libc.msgctl}.get(obj.kind)
    result = call(obj.ident, IPC_RMID, None) if call is not None \
        else _libc.semctl(obj.ident, 0, IPC_RMID)
    if result != 0:
        err = ctypes.get_errno()
        if err not in (22, 43):  # EINVAL, EIDRM: removed meanwhile
            raise OSError(err, f"removing {obj.kind.value} {obj.ident}: {os.strerror(err)}")
