"""Channels between two real TCG guests: the agent inside each guest serves its workload's
channel (an abstract socket in the guest), the host broker passes the message between the
guests' agent links, and the receiving guest's workload prints what it got. The two guests
boot at once (about 20 s under TCG)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import subprocess
from collections.abc import Iterator

import pytest

from hvtsm.host import probe_host
from hvtsm.lifecycle import Manager, ZoneRun
from hvtsm.policy.loader import parse_policy
from hvtsm.policy.model import ChannelGrant
from hvtsm.store import Store
from hvtsm.store.audit import zone_trail
from hvtsm.zones.base import Backend, WorkloadIO
from hvtsm.zones.factory import driver_factory
from tests.integration.test_libvirt_zone import _libvirt_ready

pytestmark = [pytest.mark.integration, pytest.mark.libvirt]

POLICY = """
name = "guest-channels"
[[phase]]
at = "0s"
network = "none"
memory = "256MiB"
[[phase]]
at = "5m"
action = "terminate"
[anomaly]
monitor = true
reaction = "accelerate"
"""

RECEIVER = r"""
import sys
from guest_agent.channel import open_channel
sender, data = open_channel().recv(timeout=120)
sys.stdout.buffer.write(data + b"|from " + sender.encode() + b"\n")
sys.stdout.flush()
"""

SENDER = r"""
from guest_agent.channel import open_channel, ChannelRefused
ch = open_channel()
ch.send("right", b"across two guests " * 5000, timeout=120)
try:
    ch.send("nobody", b"x", timeout=60)
except ChannelRefused as e:
    print("refused:", e.reason)
print("sent")
"""


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Manager]:
    reason = _libvirt_ready()
    if reason and not os.environ.get("CI"):
        pytest.skip(reason)
    assert reason is None, reason
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('gch') / 'hvtsm.db'}")
    mgr = Manager(store, driver_factory(Backend.LIBVIRT, probe_host()))
    mgr.start()
    yield mgr
    mgr.shutdown()
    store.dispose()


def test_two_guests_exchange_a_message(manager: Manager) -> None:
    policy = parse_policy(POLICY.encode(), source="guest-channels.toml")
    manager.broker.open_group("guests", ["left", "right"],
                              [ChannelGrant("left", "right", max_message=256 * 1024)])

    def launch(name: str, script: str) -> ZoneRun:
        return manager.launch(policy, ["python3", "-c", script], name=name, group="guests",
                              policy_toml=POLICY, backend=Backend.LIBVIRT,
                              io=WorkloadIO(stdout=subprocess.PIPE, stderr=subprocess.PIPE))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        right_f = pool.submit(launch, "right", RECEIVER)
        left_f = pool.submit(launch, "left", SENDER)
        right, left = right_f.result(), left_f.result()
    assert right.workload is not None and left.workload is not None
    left_out = left.workload.stdout.read()
    right_out, right_err = right.workload.stdout.read(), right.workload.stderr.read()
    manager.wait(left.zone_id, 60)
    manager.wait(right.zone_id, 60)
    expected = b"across two guests " * 5000
    assert right_out == expected + b"|from left\n", right_err[-2000:]
    assert left_out == b"refused: no zone named nobody in channel group guests\nsent\n"
    manager.settle()
    with manager.store.session() as session:
        trail = zone_trail(session, zone_id=left.zone_id)
    rows = [e.data for e in trail if e.kind == "channel"]
    delivered = [r for r in rows if r["verdict"] == "delivered"]
    assert len(delivered) == 1 and delivered[0]["receiver_zone"] == right.zone_id
    assert delivered[0]["digest"] == hashlib.sha256(expected).hexdigest()
    assert [r["reason"] for r in rows if r["verdict"] == "refused"] == [
        "no zone named nobody in channel group guests"]
