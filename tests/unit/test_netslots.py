import ipaddress
import os
import time
from pathlib import Path

import pytest

from hvtsm.errors import ZoneError
from hvtsm.zones import netslots

GONE = lambda _zone: False  # noqa: E731
POOL = ipaddress.IPv4Network("10.213.0.0/28")  # four /30 slots


def test_reservations_never_share_a_slot(tmp_path: Path) -> None:
    got = [netslots.reserve(f"z{i}", 1, POOL, alive=GONE, root=tmp_path) for i in range(4)]
    assert sorted(got) == [0, 1, 2, 3]
    assert got[0] == 1  # the hint is tried first
    with pytest.raises(ZoneError, match="no free /30"):
        netslots.reserve("z9", 0, POOL, alive=GONE, root=tmp_path)


def test_release_frees_the_slot(tmp_path: Path) -> None:
    index = netslots.reserve("za", 2, POOL, alive=GONE, root=tmp_path)
    assert netslots.release("za", root=tmp_path) == [f"address slot 10.213.0.0_28/{index}"]
    assert netslots.reserve("zb", 2, POOL, alive=GONE, root=tmp_path) == index


def test_a_crashed_zones_old_slot_is_taken_over(tmp_path: Path) -> None:
    index = netslots.reserve("zgone", 0, POOL, alive=GONE, root=tmp_path)
    assert netslots.reserve("znew", 0, POOL, alive=GONE, root=tmp_path) != index  # young: kept
    path = tmp_path / "10.213.0.0_28" / str(index)
    old = time.time() - 120
    os.utime(path, (old, old))
    assert netslots.reserve("zlate", 0, POOL, alive=GONE, root=tmp_path) == index
