"""Channels between real cgroup zones: each zone's workload talks to the agent beside its
zone through the socket bound in the zone's own network namespace, the host broker judges
every message by the group's grants, and what arrives is what the receiving workload
prints. Every message and refusal must be in the audit trail (`hvtsm audit --json`)."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest

from hvtsm.errors import ZoneError
from hvtsm.host import probe_host
from hvtsm.lifecycle import Manager, ZoneRun
from hvtsm.policy.loader import parse_policy
from hvtsm.policy.model import ChannelGrant
from hvtsm.store import Store
from hvtsm.store.audit import zone_trail
from hvtsm.zones.base import WorkloadIO
from hvtsm.zones.cgroup.driver import CgroupDriver
from tests.integration.cli_helpers import audit

pytestmark = pytest.mark.integration

#: the system python (the controller's may live where the zone's user cannot read)
PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
#: phase 1 at 1.5 s: a channel open only in phase 0 closes then
POLICY = """
name = "channels-test"
[[phase]]
at = "0s"
network = "none"
[[phase]]
at = "1500ms"
cpu_shares = 512
[[phase]]
at = "60s"
action = "terminate"
[anomaly]
monitor = true
reaction = "accelerate"
factor = 1.1
"""

#: a workload that sends: each argument TO:SEED:SIZE sends SIZE seeded random bytes to TO;
#: "sleep:S" waits; it prints one line per message: TO, then the verdict
SENDER = r"""
import random, sys, time
from guest_agent.channel import open_channel, ChannelRefused
ch = open_channel()
for arg in sys.argv[1:]:
    to, a, b = arg.split(":") if arg.count(":") == 2 else (arg.split(":") + [""])
    if to == "sleep":
        time.sleep(float(a))
        continue
    data = random.Random(int(a)).randbytes(int(b))
    try:
        ch.send(to, data)
        print(to, "delivered", flush=True)
    except ChannelRefused as e:
        print(to, "refused:", e.reason, flush=True)
"""


#: a workload that receives with the CLI (its stdout: the message, raw), then may try to
#: send back: argv = [timeout, reply-to or ""]. Python, not sh: under seccomp monitoring a
#: shell's fork can fail with EINTR when a child's SIGCHLD lands while the fork is held
#: (dash's SIGCHLD handler has no SA_RESTART), which is no business of these tests.
RECEIVER = r"""
import subprocess, sys
CLI = [sys.executable, "-m", "guest_agent.channel"]
got = subprocess.run(CLI + ["recv", "--timeout", sys.argv[1]], stdout=subprocess.PIPE)
sys.stdout.buffer.write(got.stdout)
sys.stdout.flush()
if len(sys.argv) > 2:
    back = subprocess.run(CLI + ["send", sys.argv[2]], input=b"x")
    print("\nreverse exit", back.returncode, flush=True)
"""


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Manager, str]]:
    if os.geteuid() != 0:
        pytest.skip("cgroup zones need root")
    db = f"sqlite:///{tmp_path_factory.mktemp('channels') / 'hvtsm.db'}"
    store = Store(db)
    manager = Manager(store, partial(CgroupDriver, caps=probe_host()))
    manager.start()
    yield manager, db
    manager.shutdown()
    store.dispose()


def launch(manager: Manager, argv: list[str], name: str, group: str) -> ZoneRun:
    policy = parse_policy(POLICY.encode(), source="channels-test.toml")
    return manager.launch(policy, argv, name=name, group=group, policy_toml=POLICY,
                          user="nobody",
                          io=WorkloadIO(stdout=subprocess.PIPE, stderr=subprocess.PIPE))


def outcome(manager: Manager, run: ZoneRun) -> tuple[bytes, bytes]:
    assert run.workload is not None
    out, err = run.workload.stdout.read(), run.workload.stderr.read()
    manager.wait(run.zone_id, 30)
    assert run.ended.is_set()
    return out, err


def trail_of(manager: Manager, zone_id: str) -> list[Any]:
    with manager.store.session() as session:
        return zone_trail(session, zone_id=zone_id)


def channel_rows(db: str, zone_id: str) -> list[dict[str, Any]]:
    return [e for e in audit(db, zone_id) if e["kind"] == "channel"]


def test_granted_channel_delivers_intact_and_the_rest_is_refused_and_audited(
        env: tuple[Manager, str]) -> None:
    manager, db = env
    manager.broker.open_group("pipe", ["fetch", "parse"], [
        ChannelGrant("fetch", "parse", max_message=512 * 1024)])
    # the receiver starts first and waits; a 300 KB message travels in several pieces
    parse = launch(manager, [PY, "-c", RECEIVER, "20", "fetch"], "parse", "pipe")
    fetch = launch(manager, [PY, "-c", SENDER, "parse:7:300000", "nowhere:1:10",
                             "parse:2:600000"], "fetch", "pipe")
    fetch_out, _ = outcome(manager, fetch)
    parse_out, parse_err = outcome(manager, parse)
    # what the receiving workload printed is exactly what was sent
    assert parse_out.startswith(payload(7, 300000) + b"\n"), parse_err
    assert b"fetch" in parse_err  # the sender's name, as recv prints it
    assert parse_out.endswith(b"reverse exit 3\n"), (  # parse -> fetch is not granted
        parse_err, [e.summary for e in trail_of(manager, parse.zone_id)])
    lines = fetch_out.decode().splitlines()
    assert lines[0] == "parse delivered"
    assert lines[1] == "nowhere refused: no zone named nowhere in channel group pipe"
    assert lines[2] == ("parse refused: 600000 bytes exceed the channel's max_message of "
                        "524288 bytes")
    manager.settle()
    rows = channel_rows(db, fetch.zone_id)
    by_verdict = {(r["receiver_name"], r["verdict"]): r for r in rows}
    delivered = by_verdict[("parse", "delivered")]
    assert delivered["size"] == 300000 and delivered["receiver_zone"] == parse.zone_id
    assert delivered["digest"] == hashlib.sha256(payload(7, 300000)).hexdigest()
    assert "content_base64" not in delivered  # no audit_content: size and digest only
    big = by_verdict[("parse", "refused")]
    assert big["size"] == 600000 and big["digest"] == hashlib.sha256(
        payload(2, 600000)).hexdigest()
    assert by_verdict[("nowhere", "refused")]["receiver_zone"] is None
    reverse = [r for r in channel_rows(db, parse.zone_id) if r["sender_zone"] == parse.zone_id]
    assert len(reverse) == 1 and reverse[0]["verdict"] == "refused"
    assert reverse[0]["reason"] == "no channel from parse to fetch is granted"
    assert reverse[0]["size"] == 1 and reverse[0]["digest"] == hashlib.sha256(b"x").hexdigest()
    assert "content_base64" not in reverse[0]
    # each refusal is an anomaly of its sender, and its policy reacted
    with manager.store.session() as session:
        trail = zone_trail(session, zone_id=fetch.zone_id)
    refused = [e for e in trail if e.kind == "anomaly" and e.data["category"] == "channel-refused"]
    assert len(refused) == 2 and any(e.kind == "reaction" for e in trail)


def test_channel_closes_in_the_senders_later_phase(env: tuple[Manager, str]) -> None:
    manager, db = env
    manager.broker.open_group("phased", ["early", "late"], [
        ChannelGrant("early", "late", phases=(0,))])
    late = launch(manager, [PY, "-c", RECEIVER, "20"], "late", "phased")
    early = launch(manager, [PY, "-c", SENDER, "late:3:100", "sleep:2.5", "late:4:100"],
                   "early", "phased")
    early_out, early_err = outcome(manager, early)
    late_out, _ = outcome(manager, late)
    lines = early_out.decode().splitlines()
    assert lines[:1] == ["late delivered"], early_err
    assert lines[1].startswith("late refused: the channel early -> late is closed in phase")
    assert late_out == payload(3, 100)
    manager.settle()
    rows = channel_rows(db, early.zone_id)
    assert [(r["verdict"], r["sender_phase"]) for r in rows] == [("delivered", 0),
                                                                 ("refused", 1)]


def test_audit_content_keeps_the_bytes_and_held_messages_wait(
        env: tuple[Manager, str]) -> None:
    manager, db = env
    manager.broker.open_group("kept", ["src", "dst"], [
        ChannelGrant("src", "dst", audit_content=True)])
    # the sender runs first: its message is held until the receiver starts
    src = launch(manager, [PY, "-c", SENDER, "dst:5:64"], "src", "kept")
    src_out, _ = outcome(manager, src)
    assert src_out == b"dst delivered\n"
    dst = launch(manager, [PY, "-m", "guest_agent.channel", "recv", "--timeout", "10"],
                 "dst", "kept")
    dst_out, _ = outcome(manager, dst)
    assert dst_out == payload(5, 64)
    manager.settle()
    rows = channel_rows(db, src.zone_id)  # the held row names no receiver zone yet
    assert [r["verdict"] for r in rows] == ["held", "delivered"]
    assert rows[1]["receiver_zone"] == dst.zone_id
    assert [r["verdict"] for r in channel_rows(db, dst.zone_id)] == ["delivered"]
    assert all(base64.b64decode(r["content_base64"]) == payload(5, 64) for r in rows)


def test_terminating_a_receiver_drops_what_waits_for_it(env: tuple[Manager, str]) -> None:
    manager, db = env
    manager.broker.open_group("gone", ["s", "r"], [ChannelGrant("s", "r")])
    # r never reads: its message waits in r's agent until r is terminated
    r = launch(manager, ["sleep", "30"], "r", "gone")
    s = launch(manager, [PY, "-c", SENDER, "r:9:32", "sleep:0.5", "r:9:32"], "s", "gone")
    outcome(manager, s)
    manager.terminate(r.zone_id, reason="test ends it")
    manager.wait(r.zone_id, 15)
    manager.settle()
    rows = channel_rows(db, r.zone_id)
    assert [row["verdict"] for row in rows] == ["delivered", "delivered", "dropped", "dropped"]
    assert rows[-1]["reason"] == "receiver ended before its workload took it"


def test_zone_name_not_in_the_group_is_refused_at_launch(env: tuple[Manager, str]) -> None:
    manager, _db = env
    manager.broker.open_group("closed-set", ["only"], [])
    with pytest.raises(ZoneError, match="not a member"):
        launch(manager, ["true"], "intruder", "closed-set")


def test_zones_cannot_reach_each_others_channel_socket(env: tuple[Manager, str]) -> None:
    """The endpoint is an abstract socket in the zone's own network namespace: the host and
    other zones cannot connect to it (so none can send in another zone's name)."""
    manager, _db = env
    manager.broker.open_group("iso", ["x"], [])
    x = launch(manager, ["sleep", "10"], "x", "iso")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with pytest.raises(OSError):
        probe.connect("\0hvtsm.channel")  # the host's namespace has no such socket
    probe.close()
    # a zone without a channel (no name) finds nothing there either, and has no HVTSM_CHANNEL
    policy = parse_policy(POLICY.encode(), source="channels-test.toml")
    other = manager.launch(policy, [PY, "-c", (
        "import os, socket\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        "try:\n    s.connect('\\0hvtsm.channel'); print('connected')\n"
        "except OSError as e:\n    print('refused', e.errno)\n"
        "print(os.environ.get('HVTSM_CHANNEL'))\n")], policy_toml=POLICY, user="nobody",
        io=WorkloadIO(stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    out, err = outcome(manager, other)
    assert out.decode().split("\n")[:2] == ["refused 111", "None"], err
    manager.terminate(x.zone_id, reason="done")
    manager.wait(x.zone_id, 15)
