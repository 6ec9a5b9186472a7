"""The sensitive files a cgroup zone may not read, replaced in its view by a tripwire.

Watching the host's own files for a zone can only notify (a permission mark on them would
make every host process's open wait on this zone's agent), so a read is reported after its
bytes were delivered, and an attempt the kernel refuses (EACCES for the zone's user) is not
seen at all. Instead each existing file the zone's sensitive_paths name is covered, in the
zone's own mount namespace, by a bind of one empty file of the zone's own
(`/run/hvtsm/tripwires/<zone>`, root's, mode 0444): the zone never reaches the real file
whatever its mode, and only the zone reaches the tripwire (it is under the controllers'
/run, which the zone's private /run hides), so the agent marks it with a permission event
(FAN_OPEN_PERM) and decides before any byte is read, without ever making a host process or
another zone wait. An open of it is an attempt on the file the bind stands on, whether the
zone's user could have read the file or not.

Files created after the zone started in a sensitive directory are not covered; the
agent's notification marks still report their reads.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

from guest_agent import fanotify
from guest_agent.profile import first_match

TRIPWIRE_DIR = Path("/run/hvtsm/tripwires")
#: files one zone's view covers at most (each is a bind mount in its namespace)
MAX_COVERED = 512
#: places the view replaces as a whole already (scratch, /run, hvtsm's own) or that are
#: not files on disk
_ELSEWHERE = ("/tmp/", "/var/tmp/", "/dev/shm/", "/run/", "/var/run/", "/var/lib/hvtsm/",
              "/var/spool/hvtsm/", "/proc/", "/sys/", "/dev/")


#: the walk is the start's cost (~5 ms here); its result holds while the directories it
#: consulted stay unchanged
_CACHE = fanotify.ExpandCache()
_CACHE_LOCK = threading.Lock()


def path_of(zone_id: str) -> Path:
    return TRIPWIRE_DIR / zone_id


def make(zone_id: str) -> Path:
    """The zone's tripwire (made once; an empty root-owned file anyone may open)."""
    TRIPWIRE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(TRIPWIRE_DIR, 0o700)
    path = path_of(zone_id)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o444)
    try:
        os.fchmod(fd, 0o444)
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)
    return path


def covered(globs: Sequence[str], *, limit: int = MAX_COVERED,
            elsewhere: tuple[str, ...] = _ELSEWHERE) -> tuple[list[str], list[str]]:
    """The existing regular files `globs` match (the real paths a tripwire goes over),
    but for those under `elsewhere`, and warnings (a walk cut short, more files than
    `limit`)."""
    with _CACHE_LOCK:  # zones start on several threads at once
        marks, warnings = _CACHE.expand(tuple(globs))
    found: list[str] = []
    for path, is_dir in marks:
        for candidate in _files(path) if is_dir else [path]:
            if candidate in found or candidate.startswith(elsewhere):
                continue
            if first_match(tuple(globs), candidate) is None or not _regular(candidate):
                continue
            if len(found) >= limit:
                warnings.append(f"sensitive paths: more than {limit} files; the rest are "
                                "watched, not replaced")
                return found, warnings
            found.append(candidate)
    return found, warnings


def _files(directory: str) -> list[str]:
    try:
        return [os.path.join(directory, n) for n in sorted(os.listdir(directory))]
    except OSError:
        return []


def _regular(path: str) -> bool:
    try:
        return os.path.isfile(path) and not os.path.islink(path)
    except OSError:
        return False


def remove(zone_id: str) -> list[str]:
    path = path_of(zone_id)
    try:
        path.unlink()
    except FileNotFoundError:
        return []
    return [f"tripwire {path}"]


def would_remove(zone_id: str) -> list[str]:
    path = path_of(zone_id)
    return [f"tripwire {path}"] if path.exists() else []


def zone_ids() -> set[str]:
    try:
        return {p.name for p in TRIPWIRE_DIR.iterdir()}
    except FileNotFoundError:
        return set()
