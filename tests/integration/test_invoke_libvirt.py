"""`hvtsm invoke` with the warm pool, in real TCG guests (three boots in all: two pool guests
in parallel, one cold guest for another trust level).

The tests run in order on one pool: a warm invoke returns the result with its audit id,
served by the guest's standby (the zone's trail says so); the next request of the same
trust level gets the same guest, a fresh standby (another pid), and nothing of the first
request left in it (its background process, its files); a request whose policy denies a
call the standby's filter does not notify starts normally (audited); a request of another
trust level
never gets that guest; a request whose zone reports an anomaly taints its guest, which is
destroyed and never handed out again; then another process (the CLI) claims the pool's
remaining guest over its channel, `hvtsm cleanup` leaves that idle guest alone, and
`hvtsm pool drain` destroys it."""

from __future__ import annotations

import json
import os
import pwd
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from hvtsm.host import probe_host
from hvtsm.invoke import Invoker, InvokeRequest
from hvtsm.lifecycle import Manager
from hvtsm.pool import registry
from hvtsm.pool.rules import PoolKey
from hvtsm.pool.warm import WarmPool
from hvtsm.store import Store
from hvtsm.store.invoke_models import GuestState
from hvtsm.store.models import Zone, ZoneEvent
from hvtsm.zones.base import Backend
from hvtsm.zones.factory import driver_factory
from tests.integration.cli_helpers import hvtsm
from tests.integration.test_libvirt_zone import _libvirt_ready

pytestmark = [pytest.mark.integration, pytest.mark.libvirt]

KEY = PoolKey("python3", "untrusted")
#: leaves a process and a file behind, and says what it found of an earlier request
LEAVE_BEHIND = b"""import glob, os, subprocess, sys
found = sorted(os.listdir('.') + glob.glob('/tmp/left-*') + glob.glob('/var/tmp/left-*')
               + glob.glob('/dev/shm/left-*'))
open('left-by-' + sys.argv[1], 'w').write('x')
for d in ('/tmp', '/var/tmp', '/dev/shm'):
    os.makedirs(d + '/left-dir-' + sys.argv[1])
    open(d + '/left-dir-' + sys.argv[1] + '/f', 'w').write('x')
    open(d + '/left-' + sys.argv[1], 'w').write('x')
subprocess.Popen(['sleep', '300'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                 start_new_session=True)
print('request', sys.argv[1], 'found', found, 'uid', os.getuid())
"""
#: ptrace is on the default policy's deny list: the agent kills the caller
PTRACE = b"""import ctypes
print('before', flush=True)
ctypes.CDLL(None).ptrace(0, 0, 0, 0)
print('SURVIVED', flush=True)
"""


@dataclass
class Setup:
    store: Store
    manager: Manager
    pool: WarmPool
    invoker: Invoker
    driver: object
    guests: list[str]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    reason = _libvirt_ready()
    if reason and not os.environ.get("CI"):
        pytest.skip(reason)
    assert reason is None, reason
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('winv') / 'hvtsm.db'}")
    manager = Manager(store, driver_factory(Backend.LIBVIRT, probe_host()), actor="test")
    driver: Any = manager.driver
    manager.start()
    pool = WarmPool(store, driver, idle=manager.events)
    guests = pool.fill(KEY, 2)  # both boot at once
    yield Setup(store, manager, pool, Invoker(manager, pool=pool), driver, guests)
    pool.close(drain=True)
    for row in registry.guests(store):
        driver.destroy_guest(row.id)  # type: ignore[attr-defined]
    manager.shutdown()
    store.dispose()


def started_detail(setup: Setup, zone_id: str) -> str:
    with setup.store.session() as session:
        [row] = session.exec(select(ZoneEvent).where(ZoneEvent.zone_id == zone_id,
                                                     ZoneEvent.kind == "started")).all()
    return row.detail


def standby_pid(setup: Setup, zone_id: str) -> int:
    """The standby pid the zone's trail names, which must be the workload's own pid."""
    detail = started_detail(setup, zone_id)
    # the start's other notes (the environment's names) follow
    found = re.match(r"pid (\d+); started from a standby prepared at \S+ \(pid (\d+)\)"
                     r"(?:;|\Z)", detail)
    assert found and found[1] == found[2], detail
    return int(found[1])


def guest_run(setup: Setup, guest: str, argv: list[str]) -> tuple[int | None, str]:
    """Run an administrative command in a pooled guest over its agent link (root)."""
    link = setup.driver.guests.link(guest)  # type: ignore[attr-defined]
    work = link.start(argv)
    out = work.stdout.read().decode()
    return work.wait(30), out


def test_warm_invoke_then_same_guest_again_with_nothing_left(setup: Setup) -> None:
    first = setup.invoker.invoke(InvokeRequest(code=LEAVE_BEHIND, name="leave.py",
                                               args=("one",)))
    assert first.warm and first.guest_id in setup.guests, first.to_json()
    assert first.exit_status == 0 and first.state == "exited" and first.anomalies == []
    nobody = pwd.getpwnam("nobody").pw_uid
    assert first.stdout.decode() == f"request one found [] uid {nobody}\n"
    assert first.guest_retired is None  # scrubbed and back in the pool
    with setup.store.session() as session:  # the audit id is the zone's id
        zone = session.exec(select(Zone).where(Zone.id == first.zone_id)).one()
    assert zone.state == "exited" and zone.group_id is not None
    # nothing of the request runs any more in the idle guest: the user's one process is
    # the standby prepared for the next request after the scrub
    status, out = guest_run(setup, first.guest_id, ["pgrep", "-a", "-U", str(nobody)])
    [line] = out.splitlines()
    assert status == 0 and "-c # hvtsm standby" in line, out
    assert int(line.split()[0]) != standby_pid(setup, first.zone_id)
    # the pooled guest's /tmp and /var/tmp are its own tmpfs, not the host's over 9p
    marker = Path(tempfile.mkdtemp(prefix="hvtsm-host-marker-", dir="/tmp"))
    try:
        for d in ("/tmp", "/var/tmp"):
            status, out = guest_run(setup, first.guest_id, ["stat", "-f", "-c", "%T", d])
            assert (status, out.strip()) == (0, "tmpfs"), (d, out)
        status, out = guest_run(setup, first.guest_id, ["ls", "-a", "/tmp"])
        assert status == 0 and marker.name not in out, out
    finally:
        marker.rmdir()
    second = setup.invoker.invoke(InvokeRequest(code=LEAVE_BEHIND, name="leave.py",
                                                args=("two",)))
    assert second.warm and second.guest_id == first.guest_id
    # no files, neither in its scratch directory nor in the guest's shared ones
    assert second.stdout.decode() == f"request two found [] uid {nobody}\n"
    # each request ran in a standby, a fresh one each time
    assert standby_pid(setup, first.zone_id) != standby_pid(setup, second.zone_id)
    kinds = [e.kind for e in registry.trail(setup.store, first.guest_id)]
    assert kinds.count("claimed") == 2 and kinds.count("released") == 2
    [row] = [g for g in registry.guests(setup.store) if g.id == first.guest_id]
    assert row.state == GuestState.IDLE and row.uses == 2


def test_request_not_covered_by_the_standby_filter_starts_normally(setup: Setup,
                                                                   tmp_path: Path) -> None:
    # the default policy, with one more denied call than the standby's filter notifies
    text = (Path(__file__).resolve().parents[2] / "policies" / "default.toml").read_text()
    assert '"ptrace", "process_vm_readv"' in text
    policy = tmp_path / "more-denied.toml"
    policy.write_text(text.replace('"ptrace", "process_vm_readv"',
                                   '"chroot", "ptrace", "process_vm_readv"'))
    result = setup.invoker.invoke(InvokeRequest(code=b"import sys\nprint('plain')\n"
                                                     b"sys.exit(5)\n",
                                                name="plain.py", policy=str(policy)))
    assert result.warm and result.stdout == b"plain\n" and result.exit_status == 5
    detail = started_detail(setup, result.zone_id)
    assert "standby not used" in detail and "filter does not notify" in detail, detail
    assert result.guest_retired is None
    # the guest is back with a new standby, which the next default request uses
    again = setup.invoker.invoke(InvokeRequest(code=b"print('again')\n", name="again.py"))
    assert again.stdout == b"again\n" and again.exit_status == 0
    standby_pid(setup, again.zone_id)  # either guest: each has its standby


def test_other_trust_level_never_gets_the_guest(setup: Setup) -> None:
    before = {g.id: g.uses for g in registry.guests(setup.store)}
    result = setup.invoker.invoke(InvokeRequest(code=b"print('trusted')\n", name="t.py",
                                                trust="trusted"))
    assert not result.warm and result.guest_id is None
    assert result.stdout == b"trusted\n" and result.exit_status == 0
    assert {g.id: g.uses for g in registry.guests(setup.store)} == before
    assert not setup.driver.guest_alive(result.zone_id)  # type: ignore[attr-defined]


def test_anomaly_taints_and_destroys_the_guest(setup: Setup) -> None:
    result = setup.invoker.invoke(InvokeRequest(code=PTRACE, name="ptrace.py"))
    assert result.warm and result.guest_id in setup.guests
    assert "SURVIVED" not in result.stdout.decode()
    assert [a["kind"] for a in result.anomalies][:1] == ["denied-syscall"], result.anomalies
    assert result.guest_retired is not None and "tainted" in result.guest_retired
    assert not setup.driver.guest_alive(result.guest_id)  # type: ignore[attr-defined]
    [row] = [g for g in registry.guests(setup.store, include_retired=True)
             if g.id == result.guest_id]
    assert row.state == GuestState.RETIRED and "tainted" in (row.tainted or "")
    assert "destroyed" in [e.kind for e in registry.trail(setup.store, result.guest_id)]
    # never handed out again: the next request gets the pool's other guest (or none)
    after = setup.invoker.invoke(InvokeRequest(code=b"print('next')\n", name="n.py"))
    assert after.guest_id != result.guest_id and after.stdout == b"next\n"


def test_another_process_claims_cleanup_keeps_drain_destroys(setup: Setup,
                                                             tmp_path: Path) -> None:
    setup.pool.close()  # lets go of its links: the CLI's process connects instead
    idle = [g.id for g in registry.guests(setup.store) if g.state == GuestState.IDLE]
    assert idle, "no idle guest left for the CLI"
    program = tmp_path / "cli.py"
    program.write_text("import sys\nprint('from the cli', sys.argv[1:])\n")
    db = setup.store.url
    out = hvtsm(db, "invoke", str(program), "--arg", "x", "--json", timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["warm"] is True and result["guest"] in idle, result
    assert result["stdout"] == "from the cli ['x']\n" and result["audit_id"] == result["zone"]
    status = hvtsm(db, "pool", "status", "--json", check=True).stdout.splitlines()
    states = {json.loads(line)["guest"]: json.loads(line)["state"] for line in status}
    assert states[result["guest"]] == "idle"
    plan = json.loads(hvtsm(db, "cleanup", "--dry-run", "--json", check=True).stdout)
    assert result["guest"] not in [a["zone"] for a in plan["zones"]]
    drained = json.loads(hvtsm(db, "pool", "drain", "--json", check=True).stdout)
    assert result["guest"] in drained["drained"]
    assert not setup.driver.guest_alive(result["guest"])  # type: ignore[attr-defined]
