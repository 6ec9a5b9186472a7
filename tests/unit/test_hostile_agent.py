"""A compromised agent writes what it likes to its channel: the host's reader stays up,
bounds its memory, and the zone is flagged (anomalies, then the policy's reactions) through
the same path real agent reports take. Real link, real SQLite store, fake driver."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time
from pathlib import Path

import pytest
from sqlmodel import select

from hvtsm.lifecycle import Manager
from hvtsm.monitor.events import LinkEvents
from hvtsm.monitor.link import AgentLink
from hvtsm.policy import parse_policy
from hvtsm.store import Store
from hvtsm.store.models import Anomaly, Reaction, ZoneState
from tests.unit.fake_driver import FakeDriver

POLICY = """
name = "hostile"
[[phase]]
at = "0s"
memory = "256MiB"
[[phase]]
at = "60s"
network = "none"
[anomaly]
reaction = "accelerate"
escalate = ["freeze", "terminate"]
"""

HELLO = {"type": "hello", "seq": 0, "protocol": 1, "agent_version": "evil",
         "capabilities": ["events:anomaly"], "pid": 1, "kernel": "k", "python": "3",
         "boot_ms": 1, "heartbeat": 0.5}


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.parametrize("stream", ["random-bytes", "huge-line", "flood", "junk-json"])
def test_hostile_stream_flags_the_zone(tmp_path: Path, stream: str) -> None:
    store = Store(f"sqlite:///{tmp_path / 'hvtsm.db'}")
    manager = Manager(store, FakeDriver)
    manager.start()
    run = manager.launch(parse_policy(POLICY.encode(), source="h.toml"), ["true"],
                         policy_toml=POLICY)
    sink = LinkEvents.for_zone(manager.events, run.zone_id)
    on_problem, on_event = sink.problem, sink.event
    ours, theirs = socket.socketpair()
    link = AgentLink.from_socket(ours, zone_id=run.zone_id, on_problem=on_problem,
                                 on_event=on_event)
    rng = random.Random(stream)
    if stream == "random-bytes":
        payload = rng.randbytes(4 << 20)
    elif stream == "huge-line":
        payload = b"{" * (80 << 20)
    elif stream == "flood":
        payload = b"".join(b'{"type":"heartbeat","seq":%d,"uptime":1}\n' % i
                           for i in range(1, 300_000))
    else:
        payload = b"\n".join(json.dumps(rng.choice([[1], {"type": 7}, "x", None, {"seq": -1}]))
                             .encode() for _ in range(20_000)) + b"\n"
    before = rss_mib()

    def write() -> None:
        with contextlib.suppress(OSError):  # the link may give up on us: that is allowed
            theirs.sendall(json.dumps(HELLO).encode() + b"\n" + payload)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    writer.join(60)
    deadline = time.time() + 20
    while time.time() < deadline and not run.ended.is_set():
        manager.settle(1)
        with store.session() as session:
            if session.exec(select(Reaction)).first() is not None:
                break
        time.sleep(0.05)
    manager.settle(5)
    grew = rss_mib() - before
    link.close()
    theirs.close()
    manager.shutdown()
    with store.session() as session:
        kinds = {a.kind for a in session.exec(select(Anomaly))}
        actions = [r.action for r in session.exec(select(Reaction))]
    assert kinds & {"malformed-message", "message-flood", "heartbeat-lost"}, kinds
    assert actions, "the zone was reacted to"
    assert run.state in (ZoneState.RUNNING, ZoneState.FROZEN, ZoneState.TERMINATED)
    assert grew < 100, f"the reader's memory grew {grew:.0f} MiB"
