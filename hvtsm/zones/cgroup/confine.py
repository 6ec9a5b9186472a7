"""Who a cgroup zone's workload is and what it sees: its identity (hvtsm/zones/identity.py)
turned into the user it runs as, and its view of the host (view.py) worked out from its
state, its command line and its restrictions, before the fork."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hvtsm.agent_stage import ZONE_UNITS, stage_agent
from hvtsm.errors import ZoneError
from hvtsm.restrictions import Restrictions
from hvtsm.zones.cgroup import tripwire, view
from hvtsm.zones.cgroup.launcher import UserInfo
from hvtsm.zones.cgroup.state import CgroupZoneState
from hvtsm.zones.identity import Identities, Identity


def workload_user(zone_id: str, state: CgroupZoneState) -> UserInfo | None:
    """The zone's own identity, else the named user, else None (the controller's user)."""
    if state.uid is not None:
        return UserInfo.of(Identity(state.uid))
    if state.user is None:
        return None
    return UserInfo.lookup(state.user, zone_id)


def zone_view(applied: Restrictions, state: CgroupZoneState, argv: Sequence[str],
              user: UserInfo | None, readonly: bool, *,
              keep_run: tuple[bytes, ...], wire: Path | None = None) -> view.ViewSpec:
    """Everything of the host read-only but the zone's own scratch (sized by its memory
    limit), with what its command line names in a hidden place bound back read-only, and
    its sensitive files covered by `wire` (its tripwire, when it is watched)."""
    covered: list[str] = []
    if wire is not None and state.monitor is not None:
        covered, _warnings = tripwire.covered(state.monitor.get("sensitive_paths") or ())
    cwd = state.cwd or os.getcwd()
    binds = list(view.named_binds(argv, cwd, units=ZONE_UNITS))
    if state.channel is not None:  # the channel's client library is on its PYTHONPATH
        binds.append(os.fsencode(stage_agent()))
    account = None
    if state.uid is not None and user is not None:
        account = view.Account(user.name, user.uid, user.gid, user.home)
    return view.ViewSpec(
        scratch_size=applied.memory or view.DEFAULT_SCRATCH, host_readonly=True,
        readonly=readonly, binds=tuple(binds), keep_run=keep_run,
        cgroups=view.cgroup_mounts(state.cgroups), account=account,
        workdir=os.fsencode(cwd),
        tripwire=os.fsencode(wire) if wire is not None and covered else None,
        covered=tuple(os.fsencode(p) for p in covered))


def release_identity(identities: Identities, zone_id: str) -> list[str]:
    """Give back the zone's identity (called once nothing of the zone is left)."""
    return [f"zone identity {uid}" for uid, owner in identities.claimed().items()
            if owner == zone_id and identities.release(uid, zone_id)]


def describe(spec: view.ViewSpec, user: UserInfo | None) -> str:
    """The start notice's word on it (audited with the zone's start)."""
    who = f"identity {user.name}" if user is not None and spec.account is not None else \
        f"user {user.name}" if user is not None else "the controller's user"
    binds = f"; {len(spec.binds)} path(s) of the command line bound in read-only" \
        if spec.binds else ""
    if spec.covered:
        binds += f"; {len(spec.covered)} sensitive file(s) behind a tripwire"
    return (f"{who}; own PID, IPC, cgroup and network namespaces; private /tmp, /var/tmp, "
            f"/dev/shm and /run (at most {spec.scratch_size >> 20} MiB each); the rest of "
            f"the host read-only{binds}")


def verify(pid: int, user: UserInfo | None, zone_id: str) -> None:
    """The effect, read back from the kernel: the workload runs as the zone's user, in a
    PID namespace of its own. A workload already gone has nothing left to check."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except FileNotFoundError:
        return
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    uids = {int(x) for x in fields.get("Uid", "").split()}
    nspid = fields.get("NSpid", "").split()
    if user is not None and uids and uids != {user.uid}:
        raise ZoneError(f"the workload runs as uid(s) {sorted(uids)}, not {user.uid}: "
                        "the zone is not isolated", zone_id=zone_id)
    if len(nspid) == 1:  # a zombie shows none; one entry: the host's namespace
        raise ZoneError("the workload runs in the host's PID namespace: the zone is not "
                        "isolated", zone_id=zone_id)
