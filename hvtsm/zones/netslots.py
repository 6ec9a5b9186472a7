"""Host-wide reservation of a zone's /30 in the address pool.

Controllers with different stores share one host, so the store's row numbers cannot keep
two live zones off the same addresses (two veths with one address break routing for
both). Each reservation is a file `/run/hvtsm/net-slots/<pool>/<index>` made with O_EXCL,
holding the zone id; it goes when the zone is torn down, and one whose zone the backend
says is gone (a crash) is taken over once it is older than a zone's creation.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import time
from collections.abc import Callable
from pathlib import Path

from hvtsm.errors import ZoneError

SLOTS_ROOT = Path("/run/hvtsm/net-slots")
#: a reservation this young may belong to a zone whose namespace is still being made
_GRACE_S = 30.0


def slot_count(pool: ipaddress.IPv4Network) -> int:
    """How many /30s the pool holds."""
    return pool.num_addresses // 4


def _dir(pool: ipaddress.IPv4Network, root: Path) -> Path:
    return root / str(pool).replace("/", "_")


def reserve(zone_id: str, hint: int, pool: ipaddress.IPv4Network, *,
            alive: Callable[[str], bool], root: Path = SLOTS_ROOT) -> int:
    """The first free slot index at or after `hint` (wrapping around). `alive(zone_id)`
    tells whether a reservation's zone still has its network."""
    slots = _dir(pool, root)
    slots.mkdir(parents=True, exist_ok=True)
    count = slot_count(pool)
    for step in range(count):
        index = (hint + step) % count
        path = slots / str(index)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if not _stale(path, alive):
                    break
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(zone_id)
            return index
    raise ZoneError(f"no free /30 left in the zone address pool {pool}",
                    zone_id=zone_id, hint="give a larger pool with --net-pool")


def release(zone_id: str, *, root: Path = SLOTS_ROOT) -> list[str]:
    """Drop every reservation held by `zone_id`; returns what was dropped."""
    released: list[str] = []
    if not root.is_dir():
        return released
    for slots in root.iterdir():
        for path in slots.iterdir():
            with contextlib.suppress(OSError):
                if path.read_text().strip() == zone_id:
                    path.unlink()
                    released.append(f"address slot {slots.name}/{path.name}")
    return released


def held(zone_id: str, *, root: Path = SLOTS_ROOT) -> list[str]:
    """The reservations `release` would drop now (nothing is changed)."""
    out: list[str] = []
    if not root.is_dir():
        return out
    for slots in root.iterdir():
        for path in slots.iterdir():
            with contextlib.suppress(OSError):
                if path.read_text().strip() == zone_id:
                    out.append(f"address slot {slots.name}/{path.name}")
    return out


def _stale(path: Path, alive: Callable[[str], bool]) -> bool:
    try:
        owner = path.read_text().strip()
        age = time.time() - path.stat().st_mtime
    except OSError:
        return False
    return age > _GRACE_S and not alive(owner)
