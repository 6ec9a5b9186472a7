"""Zone identities: never two live zones on one number, never a number whose process
remains, handed out in order across restarts."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest

from hvtsm.errors import ZoneError
from hvtsm.zones import identity
from hvtsm.zones.identity import FIRST_UID, RANGE, Identities, Identity, in_range, known_user


def make(tmp_path: Path, busy: set[int] | None = None) -> Identities:
    return Identities(state_dir=tmp_path / "state", claim_dir=tmp_path / "claims",
                      busy=lambda: set(busy or ()))


def test_numbers_come_in_order_and_survive_a_restart(tmp_path: Path) -> None:
    first = make(tmp_path).claim("a")
    second = make(tmp_path).claim("b")  # another controller, the same host
    assert (first.uid, second.uid) == (FIRST_UID, FIRST_UID + 1)
    assert in_range(first.uid) and not in_range(FIRST_UID - 1)
    assert first.gid == first.uid and first.name == f"hvtsm-{FIRST_UID}"
    assert make(tmp_path).claimed() == {FIRST_UID: "a", FIRST_UID + 1: "b"}


def test_a_released_number_is_not_handed_out_again_soon(tmp_path: Path) -> None:
    ids = make(tmp_path)
    one = ids.claim("a")
    assert ids.release(one, "a")
    assert ids.claim("b").uid == one.uid + 1
    assert ids.claimed() == {one.uid + 1: "b"}


def test_release_leaves_another_zones_claim_alone(tmp_path: Path) -> None:
    ids = make(tmp_path)
    one = ids.claim("a")
    assert not ids.release(one, "b")
    assert not ids.release(Identity(one.uid + 7), "a")
    assert ids.claimed() == {one.uid: "a"}


def test_after_the_range_came_round_live_claims_and_busy_numbers_are_passed_over(
        tmp_path: Path) -> None:
    ids = make(tmp_path, busy={FIRST_UID + 1})
    ids.claim("live")  # FIRST_UID, still claimed
    (tmp_path / "state" / "next").write_text(str(RANGE))  # the counter wrapped
    assert ids.claim("new").uid == FIRST_UID + 2


def test_concurrent_claims_never_share_a_number(tmp_path: Path) -> None:
    ids = make(tmp_path)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda i: ids.claim(f"z{i}").uid, range(200)))
    assert len(set(got)) == 200


def test_a_full_range_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                       ) -> None:
    monkeypatch.setattr(identity, "RANGE", 3)
    ids = make(tmp_path)
    for name in "abc":
        ids.claim(name)
    with pytest.raises(ZoneError, match="no zone identity is free"):
        ids.claim("d")


def test_known_users() -> None:
    assert known_user("zone") and known_user("root")
    assert not known_user("no-such-user-hvtsm")
