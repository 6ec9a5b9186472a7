"""The warm pool: guests booted ahead of requests, keyed by runtime and trust level.

A pooled guest boots with the pool's baseline (NIC present, the pool's memory), its agent
says hello, its scratch directory is made, and it waits with no workload. A request claims
one of its own key (an atomic update of its `warm_guest` row, so processes sharing the
store never share a guest), the zone's initial restrictions are applied over the baseline
(tightening only), and the workload starts through the agent. Afterwards the guest serves
again only if the rules say so (`rules.retire_reason`): otherwise it is destroyed, and
both are audited (`guest_event`).

After each scrub (at boot and after each zone) the pool has the guest's agent prepare a
*standby* for the guest's runtime (guest_agent/standby.py): the runtime started as the
pool's user under the watch of the standby policy's profile (the default policy's), waiting
for one request. The next zone's start hands the request to it (the agent falls back to a
normal start when it does not fit, and the zone's trail says which). The standby is made
after the scrub's "no process of the user survives" check, and dies with a retired guest.

In one process a `WarmPool` may keep its guests' agent links open (`hold_links`, the
fast path: no reconnect per request); guests whose link it holds are claimed only by it.
`hvtsm pool fill` lets go of its links, so any process can claim what it booted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from hvtsm.errors import HvtsmError, ZoneError
from hvtsm.pool import registry
from hvtsm.pool.rules import (
    DEFAULT_MAX_USES,
    DEFAULT_POOL_MEMORY,
    Outcome,
    PoolKey,
    baseline,
    bound,
    misfit,
    retire_reason,
    tightened,
)
from hvtsm.restrictions import Restrictions
from hvtsm.store import Store
from hvtsm.store.invoke_models import GuestState, WarmGuest
from hvtsm.store.models import ZoneState
from hvtsm.zones.base import PooledDriver, ZoneHandle, ZoneSpec

log = logging.getLogger(__name__)

#: where a workload starts in a pooled guest: emptied and made again between requests
SCRATCH = "/var/tmp/hvtsm-work"
#: guests booted at once (two cores: more only slows each boot down)
PARALLEL_BOOTS = 2
#: link problems and agent events of an idle guest that do not taint it
_HARMLESS_IDLE = frozenset({"event:stats", "event:monitor"})


@dataclass
class Lease:
    """A guest claimed for one request."""

    guest_id: str
    key: PoolKey
    state: dict[str, Any]
    base: Restrictions
    uses: int
    handle: ZoneHandle[Any] | None = None
    zone_id: str | None = None


@dataclass
class _Target:
    count: int
    booting: int = 0
    failures: list[str] = field(default_factory=list)


class IdleFeed(Protocol):
    """Where the reports of guests that serve no zone arrive (the lifecycle's inbox)."""

    def subscribe_idle(self, sink: Callable[[str, str, str], None]) -> None: ...


class WarmPool:
    """See the module docstring. `driver` drives the pooled guests; `idle` feeds the pool
    what their agents report while they serve no zone (the manager's `events`)."""

    def __init__(self, store: Store, driver: PooledDriver, *, idle: IdleFeed | None = None,
                 memory: int = DEFAULT_POOL_MEMORY,
                 max_uses: int = DEFAULT_MAX_USES, user: str = "nobody",
                 hold_links: bool = True, scratch: str = SCRATCH,
                 default_memory: int | None = None, standby: bool = True,
                 standby_policy: Any = None) -> None:
        self.store = store
        self.driver = driver
        self.memory = memory
        self.max_uses = max_uses
        self.user = user
        self.hold_links = hold_links
        self.scratch = scratch
        #: what a cold guest gets when a policy names no memory (the driver's default)
        self.default_memory = default_memory if default_memory is not None else \
            _driver_default_memory()
        self.base = baseline(memory)
        #: prepare standbys (False: every warm start is a normal watched start)
        self.standby = standby
        self._standby_policy = standby_policy
        self._standby_profile: dict[str, Any] | None = None
        if idle is not None:
            idle.subscribe_idle(self._on_idle)
        self._targets: dict[PoolKey, _Target] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._refiller: threading.Thread | None = None
        #: guests whose link this process holds
        self._held: set[str] = set()
        #: retire reasons of guests tainted while idle (for whoever asks)
        self.tainted: dict[str, str] = {}
        #: called with (guest id, event kind, detail) after each pool change (tests, CLI)
        self.on_change: Callable[[str, str, str], None] | None = None

    # -- filling ------------------------------------------------------------------------------

    def fill(self, key: PoolKey, count: int) -> list[str]:
        """Boot guests until `count` idle (or booting) guests of `key` exist; returns the
        ids of those booted now. Guests that fail to boot are retired and audited."""
        mine = registry.me()
        have = sum(1 for g in registry.guests(self.store, key=key)
                   if (g.state == GuestState.IDLE and (g.holder in (None, mine)
                                                       or not registry.holder_alive(g.holder)))
                   or (g.state == GuestState.BOOTING and registry.holder_alive(g.holder)))
        missing = max(0, count - have)
        if not missing:
            return []
        with ThreadPoolExecutor(min(PARALLEL_BOOTS, missing)) as boots:
            results = list(boots.map(lambda _i: self._boot_one(key), range(missing)))
        booted = [g for g in results if g is not None]
        if len(booted) < missing:
            raise ZoneError(f"warm pool {key}: {missing - len(booted)} of {missing} guests "
                            "failed to boot", hint="`hvtsm pool status --all` shows why")
        return booted

    def _boot_one(self, key: PoolKey) -> str | None:
        guest = "g" + secrets.token_hex(4)
        registry.add_booting(self.store, guest, key, self.memory)
        try:
            state = self.driver.boot_guest(guest, int(guest[1:], 16) % 4096, self.base)
            took = self.driver.scrub(guest, self.user, self.scratch)
        except HvtsmError as exc:
            with contextlib.suppress(HvtsmError):
                self.driver.destroy_guest(guest)
            registry.retire(self.store, guest, f"boot failed: {exc}")
            log.warning("warm pool %s: guest %s failed to boot: %s", key, guest, exc)
            return None
        ready = self._prepare_standby(guest, key)
        registry.mark_idle(self.store, guest, state, self.base, hold=self.hold_links,
                           detail=f"booted in {state.get('boot_ms')} ms, scratch ready in "
                           f"{took * 1000:.0f} ms; {ready}")
        if self.hold_links:
            self._held.add(guest)
        else:
            self.driver.detach_guest(guest)
        self._changed(guest, "idle", f"booted for {key}")
        return guest

    def keep(self, key: PoolKey, count: int) -> None:
        """Keep `count` idle guests of `key` from now on, refilled in the background
        after each claim."""
        with self._lock:
            self._targets[key] = _Target(count)
            if self._refiller is None:
                self._refiller = threading.Thread(target=self._refill_loop, name="pool-refill",
                                                  daemon=True)
                self._refiller.start()
        self._wake.set()

    def _refill_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(5.0)
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._lock:
                targets = dict(self._targets)
            for key, target in targets.items():
                try:
                    self.fill(key, target.count)
                except HvtsmError as exc:
                    target.failures.append(str(exc))
                    log.warning("warm pool %s: refill failed: %s", key, exc)

    def wait_ready(self, key: PoolKey, count: int, timeout: float = 120.0) -> bool:
        """Wait until `count` guests of `key` are idle (after `keep`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            idle = [g for g in registry.guests(self.store, key=key)
                    if g.state == GuestState.IDLE]
            if len(idle) >= count:
                return True
            time.sleep(0.1)
        return False

    # -- serving ------------------------------------------------------------------------------

    def acquire(self, key: PoolKey, initial: Restrictions) -> Lease | None:
        """An idle guest of `key` that can run a zone starting with `initial`, claimed for
        this process; None when there is none (the request boots cold)."""
        if misfit(self.base, initial, default_memory=self.default_memory) is not None:
            return None
        while True:
            row = registry.claim(self.store, key)
            if row is None:
                self._wake.set()
                return None
            lease = self._lease(row, key)
            why = misfit(lease.base, initial, default_memory=self.default_memory)
            if why is not None:
                # another pool's guest (other memory): not for this request, still good
                registry.release(self.store, row.id, uses=row.uses, hold=False,
                                 detail=f"not used: {why}")
                return None
            if not self.driver.guest_alive(row.id):
                self._retire(lease, "its domain is gone")
                continue
            self._wake.set()  # the refiller makes up for it
            return lease

    def _lease(self, row: WarmGuest, key: PoolKey) -> Lease:
        return Lease(guest_id=row.id, key=key, state=json.loads(row.driver_state),
                     base=Restrictions.from_json(json.loads(row.baseline)), uses=row.uses)

    def bind(self, lease: Lease, spec: ZoneSpec, initial: Restrictions) -> ZoneHandle[Any]:
        """`Manager.launch(create=...)`: the zone in the leased guest. On failure the guest
        is retired (ZoneError raised)."""
        lease.zone_id = spec.zone_id
        registry.bound_to(self.store, lease.guest_id, spec.zone_id)
        try:
            # the start names the guest's standby (when there is one); the agent checks
            # that it fits
            handle = self.driver.bind(spec, bound(lease.base, initial), lease.state,
                                      lease.base, standby=self.standby)
        except HvtsmError as exc:
            self._retire(lease, f"could not serve zone {spec.zone_id}: {exc}")
            raise
        self._held.add(lease.guest_id)
        lease.handle = handle
        return handle

    def give_back(self, lease: Lease) -> None:
        """A lease whose zone was never made in the guest (nothing ran there)."""
        if lease.handle is not None or lease.zone_id is not None:
            raise ZoneError(f"guest {lease.guest_id} served zone {lease.zone_id}: release it",
                            hint="use WarmPool.release after a zone ran")
        if not self.hold_links:
            self.driver.detach_guest(lease.guest_id)
            self._held.discard(lease.guest_id)
        registry.release(self.store, lease.guest_id, uses=lease.uses, hold=self.hold_links,
                         detail="given back unused")

    def release(self, lease: Lease, *, zone_state: ZoneState, request_key: PoolKey,
                settle: Callable[[], object] | None = None) -> str | None:
        """After the lease's zone ended: back to the pool (scrubbed) or retired. Returns the
        retire reason, None when the guest serves again. `settle` waits for anomalies
        reported so far to reach the store (Manager.settle)."""
        handle = lease.handle
        applied = handle.applied if handle is not None else lease.base
        left = self.driver.released(handle) if handle is not None else None
        uses = lease.uses + 1

        def outcome() -> Outcome:
            if settle is not None:
                settle()
            return Outcome(key=lease.key, request_key=request_key,
                           anomalies=registry.served_anomalies(self.store, lease.guest_id),
                           zone_state=zone_state, tightened=tightened(lease.base, applied),
                           destroyed=left is None or left.destroyed,
                           uses=uses, max_uses=self.max_uses,
                           nic_lost=lease.base.network.has_nic and left is not None
                           and left.nic_lost)

        reason = retire_reason(outcome())
        if reason is None and lease.guest_id in self.tainted:
            reason = self.tainted[lease.guest_id]
        if reason is None:
            try:
                self.driver.scrub(lease.guest_id, self.user, self.scratch)
            except HvtsmError as exc:
                reason = f"scrub failed: {exc}"
        if reason is None:
            # a leftover process may have misbehaved until the scrub killed it
            reason = retire_reason(outcome()) or self.tainted.get(lease.guest_id)
        if reason is not None:
            self._retire(lease, reason, uses=uses)
            return reason
        # after the scrub's check: the new standby is no leftover of the zone
        ready = self._prepare_standby(lease.guest_id, lease.key)
        hold = self.hold_links
        if not hold:
            self.driver.detach_guest(lease.guest_id)
            self._held.discard(lease.guest_id)
        registry.release(self.store, lease.guest_id, uses=uses, hold=hold,
                         detail=f"zone {lease.zone_id} exited cleanly; scrubbed "
                         f"({uses} of {self.max_uses} uses); {ready}")
        self._changed(lease.guest_id, "idle", f"back in the pool after zone {lease.zone_id}")
        return None

    def _prepare_standby(self, guest: str, key: PoolKey) -> str:
        """A standby for the guest's next zone; says what became of it (for the guest's
        trail). A failure leaves a guest that starts its next workload normally."""
        if not self.standby:
            return "no standby (off)"
        profile = self.standby_profile()
        if profile is None:
            return "no standby (the standby policy is not monitored)"
        t0 = time.monotonic()
        try:
            ready = self.driver.prepare_standby(guest, key.runtime, self.user, profile)
        except HvtsmError as exc:
            log.warning("guest %s: no standby: %s", guest, exc)
            return f"no standby: {exc}"[:300]
        if ready is None:
            return f"no standby for runtime {key.runtime}"
        return (f"standby pid {ready.get('pid')} ready in "
                f"{(time.monotonic() - t0) * 1000:.0f} ms")

    def standby_profile(self) -> dict[str, Any] | None:
        """The monitoring profile standbys are started under: the standby policy's (the
        default policy's) at its start over the pool's baseline. A request whose profile
        needs calls this filter does not notify starts normally."""
        if self._standby_profile is None:
            from hvtsm.monitor.anomalies import zone_profile
            from hvtsm.policy import load_policy
            from hvtsm.policy.catalog import default_policy_path

            policy = self._standby_policy or load_policy(default_policy_path())
            if not policy.anomaly.monitor:
                return None
            self._standby_profile = zone_profile(policy.anomaly.profile(),
                                                 bound(self.base, policy.initial()))
        return self._standby_profile

    def _retire(self, lease: Lease, reason: str, *, uses: int | None = None) -> None:
        removed: list[str] = []
        with contextlib.suppress(HvtsmError):
            removed = self.driver.destroy_guest(lease.guest_id)
        self._held.discard(lease.guest_id)
        registry.retire(self.store, lease.guest_id, reason, removed=removed, uses=uses)
        self._changed(lease.guest_id, "retired", reason)

    # -- idle guests --------------------------------------------------------------------------

    def _on_idle(self, guest: str, kind: str, detail: str) -> None:
        """From the driver (a link reader thread): something about a guest that serves no
        zone. Anything but routine agent events taints it: destroyed, never handed out."""
        if kind == "event" and f"event:{detail}" in _HARMLESS_IDLE:
            return
        reason = f"while serving no zone: {kind}: {detail}"[:500]
        self.tainted.setdefault(guest, reason)
        threading.Thread(target=self._taint, args=(guest, reason), name=f"taint-{guest}",
                         daemon=True).start()

    def _taint(self, guest: str, reason: str) -> None:
        with self.store.session() as session:
            row = session.get(WarmGuest, guest)
            state = row.state if row is not None else None
        if state == GuestState.IDLE:
            # a busy guest is retired by the release that follows its zone
            claimed = registry.claim_one(self.store, guest)
            if claimed:
                removed: list[str] = []
                with contextlib.suppress(HvtsmError):
                    removed = self.driver.destroy_guest(guest)
                self._held.discard(guest)
                registry.retire(self.store, guest, reason, removed=removed)
                self._changed(guest, "retired", reason)

    # -- ending -------------------------------------------------------------------------------

    def drain(self, key: PoolKey | None = None) -> list[str]:
        """Destroy the idle guests (of `key`) that no other live process holds."""
        drained = []
        for row in registry.guests(self.store, key=key):
            if row.state != GuestState.IDLE:
                continue
            if row.holder not in (None, registry.me()) and registry.holder_alive(row.holder):
                continue
            if not registry.claim_one(self.store, row.id):
                continue
            removed: list[str] = []
            with contextlib.suppress(HvtsmError):
                removed = self.driver.destroy_guest(row.id)
            self._held.discard(row.id)
            registry.retire(self.store, row.id, "drained", removed=removed)
            drained.append(row.id)
        return drained

    def close(self, *, drain: bool = False) -> None:
        """Stop refilling; destroy this pool's idle guests (`drain`) or let go of their
        links so other processes can claim them."""
        self._stop.set()
        self._wake.set()
        if self._refiller is not None:
            self._refiller.join(60)
        if drain:
            self.drain()
            return
        held = sorted(self._held)
        for guest in held:
            self.driver.detach_guest(guest)
        registry.let_go(self.store, held)
        self._held.clear()

    def _changed(self, guest: str, kind: str, detail: str) -> None:
        if self.on_change is not None:
            try:
                self.on_change(guest, kind, detail)
            except Exception:  # a watcher must not break the pool
                log.exception("pool watcher failed")


def _driver_default_memory() -> int:
    from hvtsm.zones.libvirt.guests import DEFAULT_MEMORY

    return DEFAULT_MEMORY
