"""The heartbeat watchdog judges the agent by what it could have sent, not by how long the
link's own reader was away: a starved controller (50 runs on two cores) must not report
heartbeat_lost for an agent whose heartbeats wait in the socket, and a silent agent must
still be reported within its grace (plus a small bound).

The reader is starved three ways over a socketpair: a handler that blocks it (an iteration
that takes longer than the grace), a poll that wakes up a second late (the thread was not
scheduled), and a poll that never sees the socket (so only the watchdog's own read of what
waits can find the heartbeats).
"""

from __future__ import annotations

import json
import math
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import hvtsm.monitor.link.reader as reader_mod
from hvtsm.monitor.link import AgentLink, Hello
from hvtsm.monitor.link.reader import Poller
from hvtsm.monitor.link.watchdog import Watchdog, grace_for

PERIOD = 0.1  # the agent's heartbeat period: a grace of 3 periods
GRACE = 3 * PERIOD
#: how late past its grace a silent agent may be reported
BOUND = 0.5


def line(msg: dict[str, Any]) -> bytes:
    return (json.dumps(msg) + "\n").encode()


class Peer:
    """The agent's end: a hello, then (while `beating`) a heartbeat every PERIOD / 2."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seq = 0
        self.beating = threading.Event()
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.write({"type": "hello", "protocol": 1, "agent_version": "hb",
                    "capabilities": [], "pid": 7, "kernel": "k", "python": "3",
                    "boot_ms": 1, "heartbeat": PERIOD})
        self._thread = threading.Thread(target=self._beat, name="hb-peer", daemon=True)
        self._thread.start()

    def write(self, msg: dict[str, Any]) -> None:
        with self._lock:
            self.sock.sendall(line({**msg, "seq": self.seq}))
            self.seq += 1

    def _beat(self) -> None:
        while not self.stop.wait(PERIOD / 2):
            if self.beating.is_set():
                self.write({"type": "heartbeat", "uptime": 1.0})

    def close(self) -> None:
        self.stop.set()
        self._thread.join(2)
        self.sock.close()


class Rig:
    def __init__(self, *, on_event: Callable[[dict[str, Any]], None] | None = None,
                 beating: bool = True) -> None:
        ours, theirs = socket.socketpair()
        self.problems: list[tuple[float, str, str]] = []
        self.peer = Peer(theirs)
        if beating:
            self.peer.beating.set()
        self.link = AgentLink.from_socket(ours, zone_id="hb", on_event=on_event,
                                          on_problem=lambda k, d: self.problems.append(
                                              (time.monotonic(), k, d)))
        self.hello = self.link.wait_hello(3)

    def lost(self) -> list[tuple[float, str, str]]:
        return [p for p in self.problems if p[1] == "heartbeat_lost"]

    def close(self) -> None:
        self.link.close()
        self.peer.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def _until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


class StarvedPoller:
    """select.poll, but once `starve` is set: the next poll "wakes up" `late` seconds later
    than it asked and sees nothing (its thread waited that long for a CPU, while the agent
    went on writing), or, `blind`, every poll sees only the reader's wake pipe."""

    def __init__(self, *, late: float = 0.0, blind: bool = False,
                 on_starve: Callable[[], None] | None = None,
                 on_wake: Callable[[], None] | None = None) -> None:
        self.late = late
        self.blind = blind
        #: called as the late poll begins, and as it returns
        self.on_starve = on_starve
        self.on_wake = on_wake
        self.starve = threading.Event()
        self.starved = threading.Event()
        self._all = select.poll()
        self._wake_only: Any = None

    def register(self, fd: int, eventmask: int = select.POLLIN, /) -> None:
        if self._wake_only is None:  # the reader registers its wake pipe first
            self._wake_only = select.poll()
            self._wake_only.register(fd, eventmask)
        self._all.register(fd, eventmask)

    def unregister(self, fd: int, /) -> None:
        self._all.unregister(fd)

    def poll(self, timeout: float | None = None, /) -> list[tuple[int, int]]:
        if self.starve.is_set():
            if self.blind:
                return list(self._wake_only.poll(timeout))
            if not self.starved.is_set():
                if self.on_starve is not None:
                    self.on_starve()
                time.sleep(self.late)
                if self.on_wake is not None:
                    self.on_wake()
                self.starved.set()
                return []
        return self._all.poll(timeout)


def starved(monkeypatch: pytest.MonkeyPatch, **how: Any) -> StarvedPoller:
    poller = StarvedPoller(**how)

    def make() -> Poller:
        return poller

    monkeypatch.setattr(reader_mod, "new_poller", make)
    return poller


# --- a starved reader does not blame the agent -----------------------------------------------


def test_a_slow_handler_is_no_silence_of_the_agent() -> None:
    """One iteration of the reader takes three graces (its handler blocks) while the agent
    goes on beating: the heartbeats wait in the socket, and no heartbeat_lost."""
    blocked = threading.Event()

    def slow(_event: dict[str, Any]) -> None:
        blocked.set()
        time.sleep(3 * GRACE)

    r = Rig(on_event=slow)
    try:
        before = r.link.health().messages
        r.peer.write({"type": "event", "kind": "stats", "data": {}})
        assert blocked.wait(2)
        time.sleep(4 * GRACE)  # the handler has returned; the watchdog has looked
        assert r.lost() == [] and r.link.health().heartbeat_ok
        assert r.link.health().messages > before + 5  # what waited was read
    finally:
        r.close()


def test_a_poll_that_wakes_up_late_is_no_silence_of_the_agent(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader's poll comes back a second (three graces and more) after it asked,
    having seen nothing: the agent's heartbeats meanwhile wait in the socket."""
    poller = starved(monkeypatch, late=1.0)
    r = Rig()
    try:
        poller.starve.set()
        assert poller.starved.wait(3)
        time.sleep(2 * GRACE)
        assert r.lost() == [] and r.link.health().heartbeat_ok
    finally:
        r.close()


def test_an_agent_starved_with_the_reader_gets_a_fresh_grace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent was starved too (on the same host): nothing waits in the socket when the
    reader wakes a second late, and the agent beats again within a period. The second was
    the reader's own: the agent's grace runs from the reader's next look."""
    poller = starved(monkeypatch, late=1.0)
    r = Rig()
    try:
        poller.on_starve, poller.on_wake = r.peer.beating.clear, r.peer.beating.set
        poller.starve.set()
        assert poller.starved.wait(3)
        time.sleep(2 * GRACE)
        assert r.lost() == [] and r.link.health().heartbeat_ok
    finally:
        r.close()


def test_heartbeats_waiting_unseen_are_read_before_the_agent_is_called_silent(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The poll never reports the socket (and is never late): only the watchdog's own read
    of what waits finds the heartbeats, grace after grace."""
    poller = starved(monkeypatch, blind=True)
    r = Rig()
    try:
        poller.starve.set()
        before = r.link.health().messages
        time.sleep(5 * GRACE)
        assert r.lost() == [] and r.link.health().heartbeat_ok
        assert r.link.health().messages > before  # read by the watchdog, not by the poll
    finally:
        r.close()


# --- a silent agent is still reported ---------------------------------------------------------


def test_a_silent_agent_is_reported_within_its_grace() -> None:
    r = Rig(beating=False)
    try:
        _until(lambda: bool(r.lost()), 3, "heartbeat_lost")
        took = r.lost()[0][0] - r.hello.received
        assert GRACE < took < GRACE + BOUND, took
        assert not r.link.health().heartbeat_ok and f"allowed {GRACE:g} s" in r.lost()[0][2]
        time.sleep(GRACE)
        assert len(r.lost()) == 1  # once, until the agent speaks again
        r.peer.beating.set()
        _until(lambda: r.link.health().heartbeat_ok, 2, "heartbeats again")
    finally:
        r.close()


def test_a_silent_agent_is_reported_after_the_reader_was_starved(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The stall gives the agent a fresh grace from the reader's next look, no more."""
    poller = starved(monkeypatch, late=1.0)
    r = Rig(beating=False)
    try:
        poller.starve.set()
        assert poller.starved.wait(3)
        looked = time.monotonic()
        _until(lambda: bool(r.lost()), 3, "heartbeat_lost")
        assert r.lost()[0][0] - looked < GRACE + BOUND
    finally:
        r.close()


def test_an_agent_writing_only_junk_is_silent() -> None:
    """What waits in the socket is read before the verdict, but junk is no heartbeat."""
    r = Rig(beating=False)
    try:
        deadline = time.monotonic() + 3
        while not r.lost() and time.monotonic() < deadline:
            r.peer.sock.sendall(b"junk\n" * 200)
            time.sleep(0.005)
        assert r.lost(), r.problems[-3:]
        assert r.lost()[0][0] - r.hello.received < GRACE + BOUND
    finally:
        r.close()


# --- the watchdog's rules, by the clock -------------------------------------------------------


def hello(heartbeat: float | None) -> Hello:
    return Hello.from_message({"type": "hello", "seq": 0, "protocol": 1, "agent_version": "v",
                               "capabilities": [], "pid": 1, "kernel": "k", "python": "3",
                               "boot_ms": 1, "heartbeat": heartbeat}, 0.0)


def test_grace_is_three_periods_of_a_clamped_claim() -> None:
    assert grace_for(None, None) is None  # nothing is judged before a hello
    assert grace_for(None, hello(1.0)) == 3.0
    assert grace_for(None, hello(1e-6)) == pytest.approx(0.3)  # MIN_HEARTBEAT 0.1
    assert grace_for(None, hello(1e9)) == 180.0  # MAX_HEARTBEAT 60
    assert grace_for(None, hello(None)) == 180.0  # it did not say: still watched
    assert grace_for(7.0, hello(1.0)) == 7.0  # an explicit grace wins


def test_watchdog_excuses_only_stalls_longer_than_a_period() -> None:
    dog, h = Watchdog(), hello(1.0)
    dog.heard(100.0)
    assert dog.silence(102.9, h) is None
    assert not dog.excuse(102.0, 102.9, h)  # late by less than one period: the agent's
    assert dog.silence(103.1, h) is not None
    assert dog.excuse(101.0, 105.0, h)  # late by four: the reader's own
    assert dog.silence(107.9, h) is None  # a fresh grace from the reader's look at 105
    silence = dog.silence(108.1, h)
    assert silence is not None and silence.seconds == pytest.approx(3.1)
    dog.declare()
    assert dog.silence(200.0, h) is None and dog.timeout_ms(200.0, h) == 1000
    assert dog.heard(201.0) and not dog.lost


def test_watchdog_wakes_the_reader_when_the_grace_ends() -> None:
    dog, h = Watchdog(), hello(0.1)
    assert dog.timeout_ms(0.0, h) == 1000  # nothing heard yet
    dog.heard(10.0)
    assert dog.timeout_ms(10.0, h) == 301
    assert dog.timeout_ms(10.295, h) == 10  # never a busy loop
    dog.resumed(math.inf)
    assert dog.timeout_ms(11.0, h) == 1000
