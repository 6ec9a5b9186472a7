"""A guest's schedule without a controller (issue 11, part 6) in a real TCG guest: the
controller is SIGKILLed before the network cut; the agent in the guest takes its link
down on time and, for the memory cut it cannot apply itself, stops the workload; the
controller that resumes applies the real limit and thaws it, and the zone ends on time.
What the workload saw is read from a file it wrote in the guest (about 30 s in all)."""

from __future__ import annotations

import itertools
import json
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest

from hvtsm.host import probe_host
from hvtsm.lifecycle import Manager
from hvtsm.lifecycle.deputy import DEPUTY_GRACE_S
from hvtsm.store import Store
from hvtsm.zones.base import Backend
from hvtsm.zones.factory import driver_factory
from tests.integration.cli_helpers import GATEWAY, spawn, wait_for, write_policy, zones
from tests.integration.test_libvirt_zone import ready  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.libvirt]

#: a TCG guest is slow: the agent's own lag, the probe's 100 ms period, a busy host
SLACK_S = 0.8
LOG = "/tmp/hvtsm-deputy-probe"

POLICY = """
name = "guest-unattended"
[[phase]]
at = "0s"
network = "full"
memory = "512MiB"
[[phase]]
at = "4s"
network = "loopback"
[[phase]]
at = "6s"
memory = "256MiB"
[[phase]]
at = "11s"
action = "terminate"
# the cut itself is under test (the agent's containment would kill the prober)
[anomaly]
monitor = false
"""

#: every 100 ms: a connect to the host end of the guest's NIC, stamped, appended to LOG
PROBE = GATEWAY + r"""
gw = gateway()
with open(sys.argv[1], 'a', buffering=1) as log:
    while True:
        try:
            socket.create_connection((gw, 9), timeout=0.2).close()
            net = 'ok'
        except ConnectionRefusedError:
            net = 'ok'  # the host answered: the link is up
        except OSError as e:
            net = 'failed:' + type(e).__name__
        log.write(f'{time.time()} {net}\n')
        time.sleep(0.1)
"""


def test_a_guest_keeps_its_schedule_with_the_controller_killed(ready: None,  # noqa: F811
                                                               tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'hvtsm.db'}"
    policy = write_policy(tmp_path / "guest.toml", POLICY)
    zones(db)  # the store's tables exist before two processes race to make them
    proc = spawn(db, "run", "--backend", "libvirt", "--policy", policy, "--", "python3", "-c",
                 PROBE, LOG)
    zone = wait_for(lambda: [z for z in zones(db) if z["state"] == "running"], timeout=120,
                    what="the guest zone running")[0]
    zone_id = zone["zone"]
    started = datetime.fromisoformat(zone["started"]).timestamp()
    time.sleep(max(0.0, started + 1.5 - time.time()))
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert time.time() < started + 4, "the controller must die before the network cut"
    time.sleep(max(0.0, started + 7.5 - time.time()))  # both cuts fall due meanwhile
    store = Store(db)
    manager = Manager(store, driver_factory(Backend.LIBVIRT, probe_host()))
    try:
        assert manager.start(adopt=True) == [zone_id]
        run = manager.zones[zone_id]
        link = manager.driver.agent_link(zone_id)  # type: ignore[attr-defined]
        assert link is not None
        with store.session() as session:
            from hvtsm.store.audit import zone_trail

            trail = zone_trail(session, zone_id=zone_id)
        applied = {e.data["phase"]: e.data for e in trail if e.kind == "phase"}
        assert set(applied) >= {1, 2} and run.phase_index == 2
        for index in (1, 2):
            assert "applied by the zone's agent while no controller ran" in \
                applied[index]["note"], applied[index]
            assert applied[index]["lag_ms"] < (DEPUTY_GRACE_S + SLACK_S) * 1000
        thawed = time.time()
        time.sleep(1.0)  # the thawed probe writes again
        said = link.probe("read_file", path=LOG, max_bytes=32768)["data"]
        assert run.ended.wait(30)
        ended = time.time()
    finally:
        manager.shutdown()
        store.dispose()
    samples = [(float(t), net) for t, net in (line.split() for line in said.splitlines()
                                               if len(line.split()) == 2)]
    # the guest's clock is its own (off by half a second here): the deputy keeps the
    # host's due times (its records, above, are in host time); what the workload saw is
    # judged on its own clock, against the two due times' distance
    cut = min(t for t, net in samples if net.startswith("failed"))
    assert all(net == "ok" for t, net in samples if t < cut)
    assert all(net.startswith("failed") for t, net in samples if t > cut)
    assert cut - samples[0][0] > 1.5, "the link was up until the cut"
    # stopped at the memory cut (the agent froze the workload) until the thaw
    frozen = [(a, b) for (a, _), (b, _) in itertools.pairwise(samples) if b - a > 1.0]
    assert frozen, "the workload was never stopped"
    stop, resume = frozen[0]
    assert abs((stop - cut) - 2.0) < SLACK_S, stop - cut
    assert applied[2]["applied_at"] - applied[1]["applied_at"] == pytest.approx(2.0,
                                                                                abs=SLACK_S)
    assert resume - stop > thawed - (started + 6.3) - SLACK_S  # frozen until the controller
    [row] = zones(db)
    assert row["state"] == "terminated" and row["unattended"]
    assert [p["phase"] for p in row["unattended"][0]["phases"]] == [1, 2]
    assert row["unattended"][0]["phases"][1]["froze"]
    assert ended - started < 11 + 5
    assert json.loads(json.dumps(row))
