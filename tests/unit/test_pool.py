"""Warm pool logic on a real SQLite store: the reuse rules, atomic claims across threads,
what WarmPool does with a guest after each kind of request (a fake guest driver stands in
for libvirt), and what `hvtsm cleanup` keeps."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hvtsm.errors import InvokeError, ZoneError
from hvtsm.pool import cleanup, registry
from hvtsm.pool.rules import (
    Outcome,
    PoolKey,
    baseline,
    bound,
    misfit,
    retire_reason,
    tightened,
)
from hvtsm.pool.warm import WarmPool
from hvtsm.restrictions import FilesystemMode, NetworkMode, Restrictions
from hvtsm.store import Store
from hvtsm.store.audit import record_anomaly
from hvtsm.store.invoke_models import GuestState, WarmGuest
from hvtsm.store.models import ZoneState
from hvtsm.zones.base import Backend, GuestRelease, StartFacts, ZoneHandle, ZoneSpec
from hvtsm.zones.logged import LoggedEvents

KEY = PoolKey("python3", "untrusted")
GIB = 1 << 30
NO_LIMITS = Restrictions()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'pool.db'}")


# -- rules ----------------------------------------------------------------------------------

def outcome(**kw: Any) -> Outcome:
    base: dict[str, Any] = dict(key=KEY, request_key=KEY, anomalies=0,
                                zone_state=ZoneState.EXITED, tightened=(), destroyed=False,
                                uses=1, max_uses=20)
    base.update(kw)
    return Outcome(**base)


def test_clean_exit_is_reused() -> None:
    assert retire_reason(outcome()) is None


@pytest.mark.parametrize(("change", "words"), [
    ({"anomalies": 1}, "tainted"),
    ({"zone_state": ZoneState.TERMINATED}, "not by its workload exiting"),
    ({"tightened": ("network",)}, "never loosened"),
    ({"destroyed": True}, "destroyed"),
    ({"uses": 20}, "max 20"),
    ({"request_key": PoolKey("python3", "trusted")}, "from the python3/untrusted pool"),
    ({"nic_lost": True}, "NIC"),
])
def test_each_rule_retires(change: dict[str, Any], words: str) -> None:
    reason = retire_reason(outcome(**change))
    assert reason is not None and words in reason


def test_bound_and_tightened() -> None:
    base = baseline(GIB)
    same = bound(base, Restrictions(cpu_shares=1024, memory=GIB, pids=512))
    assert tightened(base, same) == ()  # pids goes with the workload, not the guest
    assert bound(base, Restrictions()).memory == GIB
    cut = bound(base, Restrictions(network=NetworkMode.LOOPBACK, memory=GIB // 2,
                                   filesystem=FilesystemMode.RO))
    assert tightened(base, cut) == ("network", "memory", "filesystem")


def test_misfit_needs_more_than_the_guest() -> None:
    base = baseline(GIB)
    assert misfit(base, Restrictions(memory=GIB), default_memory=GIB // 2) is None
    assert misfit(base, Restrictions(), default_memory=GIB // 2) is None
    assert "memory" in (misfit(base, Restrictions(memory=2 * GIB), default_memory=0) or "")
    small = Restrictions(network=NetworkMode.LOOPBACK, memory=GIB // 2)
    assert "network" in (misfit(small, Restrictions(), default_memory=GIB // 4) or "")


def test_pool_key_names() -> None:
    with pytest.raises(InvokeError):
        PoolKey("python3", "Bad Trust")
    assert str(PoolKey("sh", "trusted")) == "sh/trusted"


# -- claims -------------------------------------------------------------------------------------

def add_idle(store: Store, n: int, key: PoolKey = KEY, holder: str | None = None) -> list[str]:
    ids = []
    for i in range(n):
        gid = f"g{i:08x}{key.trust[:2]}"
        registry.add_booting(store, gid, key, GIB)
        registry.mark_idle(store, gid, {"guest": gid, "domain": f"hvtsm-{gid}"},
                           baseline(GIB), hold=False, detail="test")
        if holder is not None:
            with store.session() as session:
                row = session.get(WarmGuest, gid)
                assert row is not None
                row.holder = holder
        ids.append(gid)
    return ids


def test_two_threads_never_claim_one_guest(store: Store) -> None:
    ids = add_idle(store, 6)
    won: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(2)

    def claimer() -> None:
        start.wait()
        for _ in range(6):
            row = registry.claim(store, KEY)
            if row is not None:
                with lock:
                    won.append(row.id)

    threads = [threading.Thread(target=claimer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == sorted(ids)  # each exactly once, none left, none twice
    assert registry.claim(store, KEY) is None
    states = {g.id: g.state for g in registry.guests(store)}
    assert set(states.values()) == {GuestState.BUSY}
    claims = [e for g in ids for e in registry.trail(store, g) if e.kind == "claimed"]
    assert len(claims) == 6


def test_claim_keeps_to_key_and_skips_live_holders(store: Store) -> None:
    add_idle(store, 1, PoolKey("python3", "trusted"))
    assert registry.claim(store, KEY) is None  # another trust level's guest
    # pid 1 is alive: its link holds the guest (one client per channel)
    init = f"1:{registry.process_start_time(1)}"
    add_idle(store, 1, KEY, holder=init)
    assert registry.claim(store, KEY) is None
    with store.session() as session:
        row = session.get(WarmGuest, "g00000000un")
        assert row is not None
        row.holder = "999999999:1"  # a dead process: its link is gone with it
    assert registry.claim(store, KEY) is not None


# -- WarmPool with a fake guest driver -------------------------------------------------------

@dataclass
class FakeGuestState:
    guest: str
    nic: bool = True
    bound: bool = False
    standby: bool = False
    destroyed: bool = False
    user: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"guest": self.guest, "nic": self.nic, "bound": self.bound}

    def facts(self) -> StartFacts:
        return StartFacts()


class FakeGuests:
    """Stands in for LibvirtDriver's guest methods; records what was done. Its idle
    reports go through `events` as the real driver's do."""

    backend = Backend.LIBVIRT

    def __init__(self) -> None:
        self.events = LoggedEvents()
        self.running: set[str] = set()
        self.scrubs: list[str] = []
        self.destroyed: list[str] = []
        self.detached: list[str] = []
        self.fail_scrub = False
        #: ("scrub" | "standby", guest) in the order they happened
        self.steps: list[tuple[str, str]] = []
        self.standby_error: str | None = None
        self.standby_profiles: list[dict[str, Any]] = []

    def boot_guest(self, guest: str, net_index: int, base: Restrictions) -> dict[str, Any]:
        self.running.add(guest)
        return {"guest": guest, "domain": f"hvtsm-{guest}", "channel_path": "/nonexistent",
                "nic": True, "boot_ms": 1.0}

    def scrub(self, guest: str, user: str, scratch: str) -> float:
        if self.fail_scrub:
            raise ZoneError("processes of the previous workload survived")
        self.scrubs.append(guest)
        self.steps.append(("scrub", guest))
        return 0.001

    def prepare_standby(self, guest: str, runtime: str, user: str,
                        monitor: dict[str, Any]) -> dict[str, Any] | None:
        if self.standby_error is not None:
            raise ZoneError(self.standby_error)
        self.steps.append(("standby", guest))
        self.standby_profiles.append(monitor)
        return {"id": "sb-" + guest, "pid": 100 + len(self.steps), "prepared": 1.7e9}

    def detach_guest(self, guest: str) -> None:
        self.detached.append(guest)

    def bind(self, spec: ZoneSpec, initial: Restrictions, state: Mapping[str, Any],
             base: Restrictions, *, standby: bool = False) -> ZoneHandle[Any]:
        return ZoneHandle(spec.zone_id, self.backend,
                          FakeGuestState(str(state["guest"]), bound=True, standby=standby),
                          initial)

    def released(self, handle: ZoneHandle[Any]) -> GuestRelease:
        return GuestRelease(destroyed=handle.state.destroyed, nic_lost=not handle.state.nic)

    def destroy_guest(self, guest: str) -> list[str]:
        self.running.discard(guest)
        self.destroyed.append(guest)
        return [f"domain hvtsm-{guest}"]

    def guest_alive(self, guest: str) -> bool:
        return guest in self.running


def serve(pool: WarmPool, zone_id: str, initial: Restrictions = NO_LIMITS, *,
          key: PoolKey = KEY) -> tuple[Any, ZoneHandle[Any]]:
    lease = pool.acquire(key, initial)
    assert lease is not None
    handle = pool.bind(lease, ZoneSpec(zone_id=zone_id, net_index=1), initial)
    return lease, handle


def test_pool_reuses_a_clean_guest_and_retires_after_max_uses(store: Store) -> None:
    fake = FakeGuests()
    pool = WarmPool(store, fake, idle=fake.events, max_uses=2, default_memory=GIB // 2)
    [guest] = pool.fill(KEY, 1)
    assert pool.fill(KEY, 1) == []  # already there
    lease, _ = serve(pool, "z1")
    assert lease.guest_id == guest
    assert pool.acquire(KEY, Restrictions()) is None  # busy: nobody else gets it
    assert pool.release(lease, zone_state=ZoneState.EXITED, request_key=KEY) is None
    assert fake.scrubs == [guest, guest]  # once at boot, once after the request
    lease, _ = serve(pool, "z2")
    assert lease.guest_id == guest and lease.uses == 1
    reason = pool.release(lease, zone_state=ZoneState.EXITED, request_key=KEY)
    assert reason is not None and "max 2" in reason
    assert fake.destroyed == [guest]
    kinds = [e.kind for e in registry.trail(store, guest)]
    assert kinds[-2:] == ["retired", "destroyed"] and kinds.count("claimed") == 2


def test_anomaly_in_any_served_zone_taints(store: Store) -> None:
    fake = FakeGuests()
    pool = WarmPool(store, fake, idle=fake.events, default_memory=GIB // 2)
    [guest] = pool.fill(KEY, 1)
    lease, _ = serve(pool, "z1")
    with store.session() as session:
        record_anomaly(session, zone_id="z1", kind="denied-syscall", detail="ptrace",
                       source="agent", evidence="{}")
    reason = pool.release(lease, zone_state=ZoneState.EXITED, request_key=KEY)
    assert reason is not None and "tainted" in reason
    assert fake.destroyed == [guest] and pool.acquire(KEY, Restrictions()) is None
    [row] = registry.guests(store, include_retired=True)
    assert row.state == GuestState.RETIRED and "tainted" in (row.tainted or "")


@pytest.mark.parametrize(("state", "initial", "handle_state", "words"), [
    (ZoneState.TERMINATED, Restrictions(), {}, "not by its workload"),
    (ZoneState.EXITED, Restrictions(network=NetworkMode.NONE), {}, "network"),
    (ZoneState.EXITED, Restrictions(memory=GIB // 4), {}, "memory"),
    (ZoneState.EXITED, Restrictions(), {"destroyed": True}, "destroyed"),
])
def test_retired_after(store: Store, state: ZoneState, initial: Restrictions,
                       handle_state: dict[str, Any], words: str) -> None:
    fake = FakeGuests()
    pool = WarmPool(store, fake, idle=fake.events, default_memory=GIB // 2)
    [guest] = pool.fill(KEY, 1)
    lease, handle = serve(pool, "z1", initial)
    for name, value in handle_state.items():
        setattr(handle.state, name, value)
    reason = pool.release(lease, zone_state=state, request_key=KEY)
    assert reason is not None and words in reason
    assert fake.destroyed == [guest]


def test_failed_scrub_retires(store: Store) -> None:
    fake = FakeGuests()
    pool = WarmPool(store, fake, idle=fake.events, default_memory=GIB // 2)
    [guest] = pool.fill(KEY, 1)
    lease, _ = serve(pool, "z1")
    fake.fail_scrub = True
    reason = pool.release(lease, zone_state=ZoneState.EXITED, request_key=KEY)
    assert reason is not None and "survived" in reason and fake.destroyed == [guest]


def test_request_needing_more_memory_gets_no_guest(store: Store) -> None:
    fake = FakeGuests()
    pool = WarmPool(store, fake, idle=fake.events, memory=GIB // 2, default_memory=GIB // 4)
    pool.fill(KEY, 1)
    assert pool.acquire(KEY, Restrictions(memory=GIB)) is None
    assert pool.acquire(PoolKey("python3", "trusted"), Restrictions()) is None
    assert pool.acquire(KEY, Restrictions(memory=GIB // 2)) is not None


def test_idle_guest_problem_taints_it(store: Store) -> None:
    fake = FakeGuests()
    pool = WarmPool(store, fake, idle=fake.events, default_memory=GIB // 2)
    [guest] = pool.fill(KEY, 1)
    fake.events.idle(guest, "event", "stats")  # routine: nothing happens
    fake.events.idle(guest, "heartbeat_lost", "no heartbeat for 3 s")
    deadline = time.monotonic() + 5

    def retired() -> bool:
        [row] = registry.guests(store, include_retired=True)
        return row.tainted is not None

    # the row is retired after the guest is destroyed, on the taint thread
    while not retired() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.destroyed == [guest]
    assert pool.acquire(KEY, Restrictions()) is None
    [row] = registry.guests(store, include_retired=True)
    assert "heartbeat_lost" in (row.tainted or "")


def test_gone_domain_is_retired_on_claim_and_drain(store: Store) -> None:
    fake = FakeGuests()
    pool = WarmPool(store, fake, idle=fake.events, default_memory=GIB // 2)
    pool.fill(KEY, 2)
    # the two boot at once: claims take the one booted first
    first, second = [g.id for g in sorted(registry.guests(store), key=lambda g: g.booted_at)]
    fake.running.discard(first)  # the domain died while idle
    lease = pool.acquire(KEY, Restrictions())
    assert lease is not None and lease.guest_id == second
    assert {g.id for g in registry.guests(store)} == {second}
    pool.give_back(lease)  # never bound to a zone: nothing ran in it
    assert pool.drain() == [second] and registry.guests(store) == []


def test_cleanup_plan(store: Store) -> None:
    ids = add_idle(store, 3)
    registry.add_booting(store, "gdeadboot", KEY, GIB)
    with store.session() as session:
        row = session.get(WarmGuest, "gdeadboot")
        assert row is not None
        row.holder = "999999999:1"
    running = {ids[0], ids[1], "gdeadboot"}
    keep, retire = cleanup.plan(store, lambda g: g in running)
    assert keep == {ids[0], ids[1]}
    assert set(retire) == {ids[2], "gdeadboot"}
    assert "gone" in retire[ids[2]] and "died" in retire["gdeadboot"]
    cleanup.apply(store, retire, {})
    assert {g.id for g in registry.guests(store)} == {ids[0], ids[1]}


def test_me_names_this_process() -> None:
    assert registry.me().startswith(f"{os.getpid()}:")
    assert registry.holder_alive(registry.me())
    assert not registry.holder_alive(None) and not registry.holder_alive("junk")


def test_standby_prepared_after_each_scrub_and_named_at_bind(store: Store) -> None:
    fake = FakeGuests()
    pool = WarmPool(store, fake, idle=fake.events, default_memory=GIB // 2)
    [guest] = pool.fill(KEY, 1)
    assert fake.steps == [("scrub", guest), ("standby", guest)]
    # the filter's deny list is the default policy's
    assert "ptrace" in fake.standby_profiles[0]["deny_syscalls"]
    lease, handle = serve(pool, "z1")
    assert handle.state.standby is True  # the driver's start names the standby
    assert pool.release(lease, zone_state=ZoneState.EXITED, request_key=KEY) is None
    # the new standby comes after the scrub's check, never before
    assert fake.steps[2:] == [("scrub", guest), ("standby", guest)]
    detail = registry.trail(store, guest)[-1].detail
    assert "standby pid" in detail, detail


def test_a_failed_standby_leaves_a_serving_guest_and_off_means_none(store: Store) -> None:
    fake = FakeGuests()
    fake.standby_error = "the loader did not start"
    pool = WarmPool(store, fake, idle=fake.events, default_memory=GIB // 2)
    [guest] = pool.fill(KEY, 1)
    assert "no standby: the loader did not start" in registry.trail(store, guest)[-1].detail
    lease, handle = serve(pool, "z1")
    assert lease.guest_id == guest
    pool.standby = False
    assert pool.release(lease, zone_state=ZoneState.EXITED, request_key=KEY) is None
    assert ("standby", guest) not in fake.steps
    _lease, handle = serve(pool, "z2")
    assert handle.state.standby is False


def test_start_note_words_for_the_zone_trail() -> None:
    from hvtsm.zones.libvirt.standby import start_note

    assert start_note(None) is None
    used = start_note({"used": True, "id": "sb-g1", "pid": 137, "prepared": 1795920636.277})
    assert used == "started from a standby prepared at 2026-11-29T02:50:36.277Z (pid 137)"
    # what a hostile agent puts there is cut short, never trusted as a time
    odd = start_note({"used": True, "pid": "x" * 500, "prepared": "soon"})
    assert odd is not None and "prepared at ?" in odd and len(odd) < 120
    fell = start_note({"used": False, "reason": "the request runs as uid 0, the standby as 65534"})
    assert fell == ("standby not used (the request runs as uid 0, the standby as 65534): "
                    "a normal start")
