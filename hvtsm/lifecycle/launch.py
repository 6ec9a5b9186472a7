"""Launching a zone: the policy's monitoring profile and transient watch, the channel
endpoint of a named zone, then the shared opening path (hvtsm/lifecycle/opening.py) with a
maker that creates the zone (or binds a warm guest) and starts the workload in it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hvtsm.errors import HvtsmError, ZoneError
from hvtsm.lifecycle.core import Core
from hvtsm.lifecycle.opening import Begun, Opener, Order
from hvtsm.lifecycle.zonerun import ZoneKind, ZoneRun
from hvtsm.policy import Policy
from hvtsm.policy.transient import monitor_transient, transient_policy
from hvtsm.restrictions import Restrictions
from hvtsm.zones.base import Backend, WorkloadIO, ZoneHandle, ZoneSpec
from hvtsm.zones.environment import ZoneEnv

#: makes the zone instead of the driver's `create` (a warm pool binds a booted guest)
Create = Callable[[ZoneSpec, Restrictions], ZoneHandle[Any]]


def monitoring_profile(policy: Policy, argv: Sequence[str],
                       expect_exec: Sequence[str]) -> dict[str, Any] | None:
    """The policy's part of the agent's profile, with the transient watch (None: the zone
    is not watched)."""
    if not policy.anomaly.monitor:
        return None
    monitor = policy.anomaly.profile()
    watch = monitor_transient(policy, argv, expect_exec)
    if watch is not None:
        monitor["transient"] = watch
    return monitor


class Launcher:
    def __init__(self, core: Core, opener: Opener) -> None:
        self.core = core
        self.opener = opener

    def launch(self, policy: Policy, argv: Sequence[str], *, io: WorkloadIO | None = None,
               user: str | None = None, scale: float = 1.0, policy_toml: str | None = None,
               backend: Backend, name: str | None = None, group: str | None = None,
               kind: ZoneKind = ZoneKind.ZONE, expect_exec: Sequence[str] = (),
               cwd: str | None = None, env: Mapping[str, str] | None = None,
               create: Create | None = None) -> ZoneRun:
        if not argv:
            raise ZoneError("no command to run", hint="give it after '--'")
        driver = self.core.driver_for(backend)
        initial = policy.initial()
        tpolicy = transient_policy(policy) if policy.anomaly.monitor else None
        monitor = monitoring_profile(policy, argv, expect_exec)
        zero = [p for p in policy.phases if p.at_ms == 0 and not p.terminate]
        toml = policy_toml if policy_toml is not None else (
            policy.text or _read_text(policy.source))
        order = Order(policy=policy, scale=scale, backend=driver.backend, command=list(argv),
                      policy_toml=toml, user=user, kind=kind, name=name, group=group,
                      created=f"policy {policy.name}, scale {scale:g}, command {list(argv)}")
        broker = self.core.channels()
        given = ZoneEnv(dict(env or {}))  # its names are audited with the start, not values

        def make(run: ZoneRun, seq: int) -> Begun:
            run.transient_policy = tpolicy
            if name is not None:
                # a named zone gets a channel: it joins its group's broker before it exists
                broker.register(run.zone_id, name=name, group=group, grants=policy.channels,
                                phase=zero[-1].index if zero else -1)
            spec = ZoneSpec(zone_id=run.zone_id, net_index=seq, user=user,
                            memory_dump=policy.memory_dump, monitor=monitor,
                            expect_exec=tuple(expect_exec), cwd=cwd, env=env, channel=name,
                            deputy=bool(policy.later_phases()))
            run.step = "could not create the zone"
            handle = (create or driver.create)(spec, initial)
            run.handle = handle
            run.step = f"could not start {argv[0]!r}"
            try:
                workload = driver.start(handle, argv, io or WorkloadIO())
            except BaseException:
                # the start's own error is the one to tell; cleanup finds anything left
                with contextlib.suppress(HvtsmError):
                    driver.terminate(handle)
                raise
            notes = [n for n in (workload.start_note, given.audit_note()) if n]
            return Begun(handle=handle, workload=workload,
                         detail="; ".join([f"pid {workload.pid}", *notes]),
                         facts=handle.state.facts())

        run = self.opener.open_zone(order, make)
        if name is not None:
            broker.started(run.zone_id)  # what was held for it goes now
        return run


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()
