"""An identity per zone: a uid and gid of its own, from a range hvtsm keeps for zones, so
the kernel itself keeps zones apart (another zone's processes cannot be signalled, traced
or read through /proc, its files are not its to open).

Numbers are handed out in order from a counter that survives reboots
(`/var/lib/hvtsm/identities/next`), so a number comes round again only after the whole
range (16 million zones) was used; even then a number is passed over while any process
still has it. A zone's files cannot outlive it either: a fresh uid owns nothing on the
host, and every directory a stranger may write to is a tmpfs of the zone's own
(hvtsm/zones/cgroup/view.py), gone with the zone. A live zone's claim on its number is a
file `/run/hvtsm/identities/<uid>` holding the zone id, made with O_EXCL under a lock, so
controllers of different stores never hand out one number twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hvtsm.errors import ZoneError
from hvtsm.zones.base import ZONE_USER

#: the range: far above every distribution's system and human users, and above the
#: subordinate ids container runtimes take (100000 + 65536 x n)
FIRST_UID = 0x3000_0000
RANGE = 0x0100_0000
STATE_DIR = Path("/var/lib/hvtsm/identities")
CLAIM_DIR = Path("/run/hvtsm/identities")


@dataclass(frozen=True)
class Identity:
    """A zone's own uid and gid (the same number), with no supplementary groups."""

    uid: int

    @property
    def gid(self) -> int:
        return self.uid

    @property
    def name(self) -> str:
        """How it is shown (it has no passwd entry: nothing on the host is its)."""
        return f"hvtsm-{self.uid}"


def known_user(name: str) -> bool:
    """Whether a workload can run as `name`: ZONE_USER, or a user of this host."""
    if name == ZONE_USER:
        return True
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def in_range(uid: int) -> bool:
    return FIRST_UID <= uid < FIRST_UID + RANGE


def _uids_with_processes(proc_root: str = "/proc") -> set[int]:
    uids: set[int] = set()
    for entry in os.listdir(proc_root):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError), \
                open(f"{proc_root}/{entry}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    uids.update(int(x) for x in line.split()[1:])
                    break
    return uids


class Identities:
    """Hands out and takes back zone identities (any thread, any process)."""

    def __init__(self, *, state_dir: Path = STATE_DIR, claim_dir: Path = CLAIM_DIR,
                 busy: Callable[[], set[int]] = _uids_with_processes) -> None:
        self.state_dir = state_dir
        self.claim_dir = claim_dir
        self._busy = busy

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o700)
        self.claim_dir.mkdir(parents=True, exist_ok=True)
        self.claim_dir.chmod(0o700)
        fd = os.open(self.state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _counter(self) -> int:
        try:
            return int((self.state_dir / "next").read_text())
        except (OSError, ValueError):
            return 0

    def _advance(self, value: int) -> None:
        tmp = self.state_dir / f".next.{os.getpid()}"
        tmp.write_text(str(value))
        tmp.replace(self.state_dir / "next")

    def claim(self, zone_id: str) -> Identity:
        """A number no live zone has, no process has, and (until the range wraps) no zone
        ever had."""
        with self._locked():
            counter = self._counter()
            busy: set[int] | None = None
            for step in range(RANGE):
                uid = FIRST_UID + (counter + step) % RANGE
                if counter + step >= RANGE:
                    # the range came round: numbers still held by a process are passed over
                    if busy is None:
                        busy = self._busy()
                    if uid in busy:
                        continue
                try:
                    fd = os.open(self.claim_dir / str(uid),
                                 os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                except FileExistsError:
                    continue
                with os.fdopen(fd, "w") as f:
                    f.write(zone_id)
                self._advance(counter + step + 1)
                return Identity(uid)
        raise ZoneError("no zone identity is free (16 million are in use)", zone_id=zone_id)

    def release(self, identity: Identity | int, zone_id: str) -> bool:
        """Give the number back once nothing of its zone runs; True when it was claimed by
        `zone_id` (a claim of another zone is left alone)."""
        uid = identity.uid if isinstance(identity, Identity) else identity
        path = self.claim_dir / str(uid)
        try:
            if path.read_text() != zone_id:
                return False
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def claimed(self) -> dict[int, str]:
        """uid -> zone id of the live claims (what `hvtsm cleanup` looks at)."""
        out: dict[int, str] = {}
        with contextlib.suppress(FileNotFoundError):
            for path in self.claim_dir.iterdir():
                if path.name.isdigit():
                    with contextlib.suppress(OSError):
                        out[int(path.name)] = path.read_text()
        return out
