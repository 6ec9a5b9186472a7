"""AgentLink's requests against a scripted agent on the other end of a socketpair: monitoring
profiles sent with `start` and replaced by `update_profile`, and their failures."""

from __future__ import annotations

import socket
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from guest_agent.protocol import Item, Message, ProtocolError, encode
from hvtsm.errors import ZoneError
from hvtsm.monitor.link import AgentLink
from tests.unit.agent_peer import serve

PROFILE = {"deny_syscalls": ["ptrace"], "network": "loopback", "egress": [],
           "max_forks_per_s": 50}


class FakeAgent:
    """Speaks the agent's side: says hello, confirms starts, answers pings, and keeps every
    message the host sent so a test can look at the wire."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received: list[Message] = []
        self.bad: list[ProtocolError] = []
        self._seq = 0
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="fake-agent", daemon=True)

    def begin(self) -> None:
        self.send({"type": "hello", "protocol": 1, "agent_version": "fake", "capabilities": [],
                   "pid": 7, "kernel": "test", "python": "3.11", "boot_ms": 1,
                   "heartbeat": 1.0})
        self._thread.start()

    def send(self, msg: Message) -> None:
        with self._send_lock:
            msg = {**msg, "seq": self._seq}
            self._seq += 1
            self.sock.sendall(encode(msg))

    def wait_for(self, pred: Callable[[Message], bool], timeout: float = 3.0) -> Message:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for msg in self.received:
                    if pred(msg):
                        return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no such message; got {self.received}")
                self._cond.wait(left)

    def _serve(self) -> None:
        serve(self.sock, self._take)

    def _take(self, item: Item) -> None:
        if isinstance(item, ProtocolError):
            self.bad.append(item)
            return
        with self._cond:
            self.received.append(item)
            self._cond.notify_all()
        self._answer(item)

    def _answer(self, msg: Message) -> None:
        if msg["type"] == "start":
            self.send({"type": "started", "id": msg["id"], "pid": 4242})
        elif msg["type"] == "ping":
            self.send({"type": "heartbeat", "uptime": 1.0, "id": msg["id"]})


@pytest.fixture
def pair() -> Iterator[tuple[AgentLink, FakeAgent, list[tuple[str, str]]]]:
    ours, theirs = socket.socketpair()
    problems: list[tuple[str, str]] = []
    agent = FakeAgent(theirs)
    agent.begin()
    link = AgentLink.from_socket(ours, zone_id="tz-api",
                                 on_problem=lambda k, d: problems.append((k, d)))
    link.wait_hello(3)
    yield link, agent, problems
    link.close()
    theirs.close()


def _starts(agent: FakeAgent) -> list[Message]:
    return [m for m in agent.received if m["type"] == "start"]


def test_start_sends_the_monitoring_profile(pair: Any) -> None:
    link, agent, _ = pair
    # frozen policy objects: a mapping proxy holding tuples must still go out as JSON
    frozen = types.MappingProxyType({**PROFILE, "deny_syscalls": ("ptrace", "bpf"),
                                     "nested": types.MappingProxyType({"a": (1, 2)})})
    work = link.start(["/bin/true"], monitor=frozen, timeout=3)
    assert work.pid == 4242
    (msg,) = _starts(agent)
    assert msg["monitor"] == {**PROFILE, "deny_syscalls": ["ptrace", "bpf"],
                              "nested": {"a": [1, 2]}}


def test_start_without_a_profile_sends_no_monitor_field(pair: Any) -> None:
    link, agent, _ = pair
    link.start(["/bin/true"], timeout=3)
    (msg,) = _starts(agent)
    assert "monitor" not in msg


def test_start_with_an_unencodable_profile_fails_and_forgets_the_workload(pair: Any) -> None:
    link, agent, _ = pair
    with pytest.raises(ZoneError, match=r"zone tz-api: .*invalid start"):
        link.start(["/bin/true"], monitor={"when": object()}, workload_id="w-bad", timeout=3)
    with pytest.raises(ZoneError, match="no workload w-bad"):
        link.signal("w-bad", 15)
    assert _starts(agent) == []


def test_update_profile_sends_a_profile_message(pair: Any) -> None:
    link, agent, _ = pair
    work = link.start(["/bin/sleep", "10"], monitor=PROFILE, timeout=3)
    tighter = {**PROFILE, "network": "none"}
    link.update_profile(work.id, types.MappingProxyType(tighter))
    msg = agent.wait_for(lambda m: m["type"] == "profile")
    assert msg == {"type": "profile", "id": work.id, "monitor": tighter}


def test_update_profile_of_a_workload_this_link_did_not_start(pair: Any) -> None:
    # an agent beside a cgroup zone watches what the zone's launcher started: the agent,
    # not the link, knows whether the workload exists (it answers an error if not)
    link, agent, problems = pair
    link.update_profile("tz-api", PROFILE)
    assert agent.wait_for(lambda m: m["type"] == "profile")["id"] == "tz-api"
    agent.send({"type": "error", "id": "tz-api", "message": "no workload tz-api"})
    deadline = time.monotonic() + 3
    while not problems and time.monotonic() < deadline:
        time.sleep(0.01)
    assert problems == [("agent_error", "tz-api: no workload tz-api")]


def test_update_profile_refuses_what_is_not_a_profile(pair: Any) -> None:
    link, _, _ = pair
    work = link.start(["/bin/true"], timeout=3)
    with pytest.raises(ZoneError, match="zone tz-api: refusing to send an invalid profile"):
        link.update_profile(work.id, ["not", "a", "mapping"])  # type: ignore[arg-type]
    with pytest.raises(ZoneError, match="invalid profile"):
        link.update_profile(work.id, {"x": float("nan")})


def test_update_profile_after_the_exit_sends_nothing(pair: Any) -> None:
    link, agent, _ = pair
    work = link.start(["/bin/true"], timeout=3)
    agent.send({"type": "exit", "id": work.id, "status": 0})
    assert work.wait(3) == 0
    link.update_profile(work.id, PROFILE)
    link.ping(3)  # anything sent before the ping has arrived by the time it is answered
    assert [m for m in agent.received if m["type"] == "profile"] == []


def test_update_profile_on_a_closed_link_names_the_zone(pair: Any) -> None:
    link, agent, _ = pair
    work = link.start(["/bin/sleep", "10"], timeout=3)
    agent.sock.shutdown(socket.SHUT_RDWR)  # the guest went away
    deadline = time.monotonic() + 3
    while not link.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    # the workload's exit is unknown, so the profile is still due, and cannot be sent
    with pytest.raises(ZoneError, match="zone tz-api: the guest agent link is closed") as e:
        link.update_profile(work.id, PROFILE)
    assert e.value.zone_id == "tz-api"


def test_a_refused_profile_comes_back_as_a_workload_error(pair: Any) -> None:
    link, agent, problems = pair
    work = link.start(["/bin/sleep", "10"], timeout=3)
    link.update_profile(work.id, {"bogus": 1})
    agent.wait_for(lambda m: m["type"] == "profile")
    agent.send({"type": "error", "id": work.id, "kind": "invalid",
                "message": "profile field 'bogus' is unknown"})
    deadline = time.monotonic() + 3
    # the reader thread records the workload's error, then tells the problem handler
    while not (work.errors and problems) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert work.errors == ["profile field 'bogus' is unknown"]
    assert ("agent_error", f"{work.id}: profile field 'bogus' is unknown") in problems
