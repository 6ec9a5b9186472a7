"""The zone's side of channels: the agent's endpoint (guest_agent/endpoint.py) with the real
client and CLI (guest_agent/channel.py) over a real unix socket, the agent's channel lane,
and the host link's separate budget for channel lines."""

from __future__ import annotations

import base64
import itertools
import os
import queue
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guest_agent import channel as client
from guest_agent.endpoint import INBOX_MESSAGES, Endpoint
from guest_agent.outbox import CHANNEL, NORMAL, URGENT, Outbox
from guest_agent.protocol import (
    CHANNEL_ENV,
    CHANNEL_MAX_BYTES,
    CHANNEL_PIECE_BYTES,
    PROTOCOL_VERSION,
    channel_pieces,
    encode,
)
from hvtsm.monitor.link import AgentLink, ChannelFault
from tests.unit.test_agent import python39

REPO = Path(__file__).resolve().parents[2]


class Host:
    """Plays the broker: takes the endpoint's channel messages, answers verdicts."""

    def __init__(self, refuse: dict[str, str] | None = None) -> None:
        self.sent: queue.Queue[dict[str, Any]] = queue.Queue()
        self.messages: dict[str, bytes] = {}
        self.acks: list[str] = []
        self.refuse = refuse or {}
        self.answer = True
        self.endpoint: Endpoint | None = None

    def put(self, msg: dict[str, Any], _size: int) -> bool:
        if msg["type"] == "channel_ack":
            self.acks.append(msg["id"])
            return True
        self.sent.put(msg)
        data = base64.b64decode(msg["data"])
        so_far = self.messages.get(msg["id"], b"") + data
        self.messages[msg["id"]] = so_far
        done = msg.get("cancel") or len(so_far) >= msg["size"]
        if done and self.answer and self.endpoint is not None:
            reason = self.refuse.get(msg["to"])
            if msg.get("cancel"):
                reason = reason or "cancelled"
            self.endpoint.on_verdict({"id": msg["id"], "verdict": "refused" if reason
                                      else "delivered", "reason": reason or "delivered"})
        return True


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Endpoint, Host, str]]:
    """An endpoint listening at a fresh abstract name, named in HVTSM_CHANNEL."""
    host = Host(refuse={"forbidden": "no channel from me to forbidden is granted"})
    stop = threading.Event()
    endpoint = Endpoint(host.put, stop)
    host.endpoint = endpoint
    name = f"hvtsm-test-{secrets.token_hex(4)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind("\0" + name)
    sock.listen(8)
    endpoint.add_listener(sock, "me")
    where = f"unix:@{name}"
    monkeypatch.setenv(CHANNEL_ENV, where)
    yield endpoint, host, where
    stop.set()
    endpoint.close()


def deliver(endpoint: Endpoint, did: str, sender: str, data: bytes) -> None:
    for piece in channel_pieces("channel_deliver", did, "from", sender, data):
        assert endpoint.on_deliver(piece) is None


def test_send_waits_for_the_verdict(served: tuple[Endpoint, Host, str]) -> None:
    _endpoint, host, _ = served
    data = os.urandom(CHANNEL_PIECE_BYTES * 2 + 17)
    with client.open_channel() as ch:
        assert ch.name == "me"
        ch.send("parse", data)
        with pytest.raises(client.ChannelRefused) as refused:
            ch.send("forbidden", b"x")
        assert refused.value.reason == "no channel from me to forbidden is granted"
    pieces = list(host.sent.queue)
    assert [p["offset"] for p in pieces[:3]] == [0, CHANNEL_PIECE_BYTES, 2 * CHANNEL_PIECE_BYTES]
    assert host.messages[pieces[0]["id"]] == data  # streamed through unchanged


def test_recv_gets_deliveries_in_order_and_acks_them(
        served: tuple[Endpoint, Host, str]) -> None:
    endpoint, host, _ = served
    big = os.urandom(CHANNEL_PIECE_BYTES * 3)
    deliver(endpoint, "d1", "fetch", b"first")
    deliver(endpoint, "d2", "fetch", big)
    with client.open_channel() as ch:
        assert ch.recv(timeout=2) == ("fetch", b"first")
        assert ch.recv(timeout=2) == ("fetch", big)
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            ch.recv(timeout=0.3)
        assert time.monotonic() - began < 3
        # a message arriving while a receive waits wakes it
        threading.Timer(0.2, deliver, args=(endpoint, "d3", "x", b"late")).start()
        assert ch.recv(timeout=5) == ("x", b"late")
    # the agent acknowledges after handing the message over: give the last ack its moment
    deadline = time.monotonic() + 5
    while len(host.acks) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert host.acks == ["d1", "d2", "d3"]


def test_send_timeout_then_next_send_skips_the_stale_verdict(
        served: tuple[Endpoint, Host, str]) -> None:
    endpoint, host, _ = served
    host.answer = False
    with client.open_channel() as ch:
        with pytest.raises(TimeoutError):
            ch.send("parse", b"slow", timeout=0.3)
        mid = host.sent.get(timeout=2)["id"]
        endpoint.on_verdict({"id": mid, "verdict": "delivered", "reason": "late"})
        host.answer = True
        with pytest.raises(client.ChannelRefused):
            ch.send("forbidden", b"y")


def test_client_gone_mid_message_cancels_it(served: tuple[Endpoint, Host, str]) -> None:
    _endpoint, host, where = served
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect("\0" + where[len("unix:@"):])
    client.read_header(sock, time.monotonic() + 2)  # ready
    sock.sendall(client.pack({"op": "send", "ref": 1, "to": "parse", "size": 100000}))
    sock.sendall(b"z" * 1000)
    sock.close()
    last = None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        last = host.sent.get(timeout=15)
        if last.get("cancel"):
            break
    assert last is not None and last.get("cancel") and last["offset"] == 0


def test_oversized_send_is_told_to_the_host_not_read(
        served: tuple[Endpoint, Host, str]) -> None:
    _endpoint, host, where = served
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect("\0" + where[len("unix:@"):])
    client.read_header(sock, time.monotonic() + 2)
    sock.sendall(client.pack({"op": "send", "ref": 1, "to": "parse",
                              "size": CHANNEL_MAX_BYTES + 1}))
    answer = client.read_header(sock, time.monotonic() + 5)
    assert answer["op"] == "verdict" and answer["verdict"] == "refused"
    only = host.sent.get(timeout=2)
    assert only["cancel"] and only["size"] == CHANNEL_MAX_BYTES + 1 and only["data"] == ""
    sock.close()


def test_inbox_is_bounded(served: tuple[Endpoint, Host, str]) -> None:
    endpoint, _host, _ = served
    for i in range(INBOX_MESSAGES):
        deliver(endpoint, f"d{i}", "f", b"m")
    problem = endpoint.on_deliver({"id": "dx", "from": "f", "size": 1, "offset": 0,
                                   "data": "bQ=="})
    assert problem is not None and "inbox is full" in problem
    assert endpoint.on_deliver({"id": "dy", "from": "f", "size": 1, "offset": 5,
                                "data": "bQ=="}) is not None
    assert endpoint.on_deliver({"id": "dz", "from": "f", "size": 1, "offset": 0,
                                "data": "!!"}) is not None


def run_cli(where: str, *args: str, stdin: bytes = b"", python: str = sys.executable,
            env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), CHANNEL_ENV: where,
           **(env_extra or {})}
    return subprocess.run([python, "-m", "guest_agent.channel", *args], input=stdin,
                          capture_output=True, env=env, timeout=30)


def test_cli_exit_codes(served: tuple[Endpoint, Host, str]) -> None:
    endpoint, host, where = served
    done = run_cli(where, "send", "parse", stdin=b"from stdin")
    assert done.returncode == 0, done.stderr
    assert b"from stdin" in host.messages.values()
    refused = run_cli(where, "send", "forbidden", stdin=b"x")
    assert refused.returncode == 3 and b"no channel from me" in refused.stderr
    timeout = run_cli(where, "recv", "--timeout", "0.2")
    assert timeout.returncode == 4
    deliver(endpoint, "d1", "fetch", b"\x00binary\xff")
    got = run_cli(where, "recv", "--timeout", "5")
    assert got.returncode == 0 and got.stdout == b"\x00binary\xff"
    assert got.stderr.strip() == b"fetch"
    assert run_cli(where, "bogus").returncode == 2
    assert run_cli("unix:@nobody-listens-here", "recv").returncode == 2
    unset = subprocess.run([sys.executable, "-m", "guest_agent.channel", "recv"],
                           capture_output=True, env={"PYTHONPATH": str(REPO)}, timeout=30)
    assert unset.returncode == 2 and b"HVTSM_CHANNEL is not set" in unset.stderr


def test_open_channel_without_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CHANNEL_ENV, raising=False)
    with pytest.raises(client.ChannelUnavailable):
        client.open_channel()
    monkeypatch.setenv(CHANNEL_ENV, "tcp:1.2.3.4")
    with pytest.raises(client.ChannelUnavailable):
        client.open_channel()


def test_client_and_cli_work_on_python39(served: tuple[Endpoint, Host, str]) -> None:
    py = python39()
    if py is None:
        pytest.skip("no python3.9 on this machine")
    endpoint, host, where = served
    assert run_cli(where, "send", "parse", stdin=b"py39", python=py).returncode == 0
    assert b"py39" in host.messages.values()
    deliver(endpoint, "d9", "f", b"to 3.9")
    got = run_cli(where, "recv", "--timeout", "5", python=py)
    assert got.returncode == 0 and got.stdout == b"to 3.9", got.stderr


# --- the agent's channel lane ---------------------------------------------------------------


def test_channel_lane_never_holds_up_urgent_messages() -> None:
    box = Outbox(channel_limit=10**9)
    stop = threading.Event()
    for i in range(100):
        assert box.put_channel({"type": "channel_send", "n": i}, 10, stop)
    box.put({"type": "event", "n": "urgent"})
    first = box.get(0.1)
    assert first is not None and first[0] == URGENT
    assert box.put({"type": "output", "n": "normal"}, NORMAL)
    lanes = [item[0] for item in (box.get(0.1), box.get(0.1), box.get(0.1))]
    assert NORMAL in lanes and CHANNEL in lanes  # they take turns


def test_channel_lane_waits_for_room_and_is_paced() -> None:
    box = Outbox(channel_limit=100, channel_lines_per_s=5)
    stop = threading.Event()
    assert box.put_channel({"type": "channel_send"}, 100, stop)
    blocked = threading.Thread(target=box.put_channel,
                               args=({"type": "channel_send"}, 10, stop))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # waits for room
    assert box.get(0.1) is not None
    blocked.join(2)
    assert not blocked.is_alive()
    for _ in range(10):
        box.put_channel({"type": "channel_send"}, 0, stop)
    got = 0
    began = time.monotonic()
    while time.monotonic() - began < 0.5:
        if box.get(0.05) is not None:
            got += 1
    assert got == 4  # 5 a second, one taken already in this second


# --- the host link's channel budget ---------------------------------------------------------


class Peer:
    """The agent's end of a link: writes numbered lines."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seq = itertools.count()

    def line(self, msg: dict[str, Any]) -> bytes:
        return encode(dict(msg, seq=next(self.seq)))

    def hello(self) -> bytes:
        return self.line({"type": "hello", "protocol": PROTOCOL_VERSION, "agent_version": "t",
                          "capabilities": ["channel"], "pid": 1, "kernel": "k",
                          "python": "3", "boot_ms": 1, "heartbeat": 30.0})


def make_link(**kwargs: Any) -> tuple[AgentLink, Peer, list[tuple[str, str]], list[Any],
                                      list[Any]]:
    ours, theirs = socket.socketpair()
    problems: list[tuple[str, str]] = []
    events: list[Any] = []
    channel: list[Any] = []
    link = AgentLink.from_socket(ours, zone_id="zc", on_problem=lambda k, d: problems.append(
        (k, d)), on_event=events.append, on_channel=channel.append, heartbeat_grace=60,
        **kwargs)
    peer = Peer(theirs)
    peer.sock.sendall(peer.hello())
    link.wait_hello(3)
    return link, peer, problems, events, channel


def until(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_busy_channel_does_not_flood_out_events() -> None:
    link, peer, problems, events, channel = make_link(flood_messages=50,
                                                      channel_lines_per_s=1000)
    try:
        lines = b"".join(peer.line({"type": "channel_send", "id": f"m{i}", "to": "b",
                                    "size": 1, "offset": 0, "data": "eA=="})
                         for i in range(300))
        lines += peer.line({"type": "event", "kind": "anomaly",
                            "data": {"category": "connect-out"}})
        peer.sock.sendall(lines)
        until(lambda: len(events) == 1 and len(channel) == 300)
        assert "flood" not in {k for k, _ in problems}
    finally:
        link.close()


def test_event_flood_does_not_starve_the_channel() -> None:
    link, peer, problems, events, channel = make_link(events_per_s=20)
    try:
        lines = b"".join(peer.line({"type": "event", "kind": "stats", "data": {}})
                         for _ in range(100))
        lines += peer.line({"type": "channel_send", "id": "m1", "to": "b", "size": 1,
                            "offset": 0, "data": "eA=="})
        peer.sock.sendall(lines)
        until(lambda: len(channel) == 1)
        assert len(events) == 20 and "events_dropped" in {k for k, _ in problems}
    finally:
        link.close()


def test_channel_line_flood_and_unusable_channel_lines_are_problems() -> None:
    link, peer, problems, _events, channel = make_link(channel_lines_per_s=10)
    try:
        peer.sock.sendall(b"".join(peer.line({"type": "channel_ack", "id": f"d{i}"})
                                   for i in range(50)))
        until(lambda: "flood" in {k for k, _ in problems})
        assert len(channel) <= 10
    finally:
        link.close()

    def refuse(_msg: Any) -> None:
        raise ChannelFault("a piece out of order")

    link, peer, problems, _events, _channel = make_link()
    try:
        link.on_channel = refuse
        peer.sock.sendall(peer.line({"type": "channel_ack", "id": "d1"}))
        until(lambda: any("out of order" in d for _, d in problems))
        link.on_channel = None
        peer.sock.sendall(peer.line({"type": "channel_ack", "id": "d2"}))
        until(lambda: any("has no channel" in d for _, d in problems))
        assert {k for k, _ in problems} == {"malformed"} and link.health().malformed == 2
    finally:
        link.close()


def test_link_writes_deliveries_in_pieces_and_verdicts() -> None:
    link, peer, _problems, _events, _channel = make_link()
    try:
        data = os.urandom(CHANNEL_PIECE_BYTES + 5)
        link.channel_deliver("d1", "fetch", data)
        link.channel_verdict("m1", "refused", "nope")
        from guest_agent.protocol import HOST_TYPES, Decoder
        decoder = Decoder(HOST_TYPES)
        got: list[Any] = []
        peer.sock.settimeout(5)
        while len(got) < 3:
            got += decoder.feed(peer.sock.recv(1 << 20))
        assert [m["type"] for m in got] == ["channel_deliver"] * 2 + ["channel_verdict"]
        assert b"".join(base64.b64decode(m["data"]) for m in got[:2]) == data
        assert got[2]["reason"] == "nope"
    finally:
        link.close()
