"""AgentLink against a hostile agent: what a compromised guest could write to the channel.

Each test puts the link on one end of a socketpair and a thread writing the other end: random
bytes, random JSON, every agent message type with its fields replaced by values of random
types, huge lines, floods, NUL bytes, invalid UTF-8, blank lines. Afterwards the reader must
be alive (or cleanly closed after EOF), the problems reported must be of the right kinds,
the process must not have grown by more than RSS_SLACK, and a ping must still come back.
Every random choice is seeded.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

from guest_agent.protocol import AGENT_TYPES, SCHEMAS, ProtocolError
from hvtsm.errors import ZoneError
from hvtsm.monitor import link as link_mod
from hvtsm.monitor.link import AgentLink
from tests.unit.agent_peer import serve

#: every problem kind the link may report (its module docstring lists them)
KINDS = {"malformed", "oversized", "seq_gap", "seq_regress", "heartbeat_lost", "agent_restart",
         "agent_error", "output_dropped", "flood", "events_dropped", "disconnected"}
RSS_SLACK = 50 * 1024 * 1024
#: ids a hostile agent might guess: the link's own request and workload ids among them
IDS = ["w1", "w2", "p1", "p2", "p3", "k1", "k2", "k3", "k4", "s1", "h1", "nope", "x" * 128]


def rss() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def line(msg: dict[str, Any]) -> bytes:
    return (json.dumps(msg, separators=(",", ":")) + "\n").encode()


class Agent:
    """The agent's end: writes what a test gives it (from a thread, as a guest would) and
    answers the link's requests, each answer on a line of its own."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seq = 0
        self.written = 0
        #: what to answer a probe with (None: nothing, it times out)
        self.on_probe: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        #: workload ids a hello lists as running
        self.running: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._serve, name="fuzz-agent", daemon=True)
        self._reader.start()

    def next_seq(self) -> int:
        with self._lock:
            self.seq += 1
            return self.seq

    def hello(self, **extra: Any) -> dict[str, Any]:
        return {"type": "hello", "seq": self.next_seq(), "protocol": 1,
                "agent_version": "fuzz", "capabilities": ["events:anomaly"], "pid": 9,
                "kernel": "k", "python": "3.11", "boot_ms": 5, "heartbeat": 1.0,
                "workloads": self.running, **extra}

    def write(self, data: bytes) -> None:
        with self._lock:
            self.sock.sendall(data)
            self.written += len(data)

    def feed(self, chunks: Iterable[bytes]) -> threading.Thread:
        """Write `chunks` from a thread; the test joins it (a reader that stopped reading
        would leave it stuck)."""
        def run() -> None:
            with self._lock:
                for chunk in chunks:
                    self.sock.sendall(chunk)
                    self.written += len(chunk)

        thread = threading.Thread(target=run, name="fuzz-writer", daemon=True)
        thread.start()
        return thread

    def _answer(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "ping":
            if msg.get("hello"):
                reply = self.hello(id=msg["id"])
            else:
                reply = {"type": "heartbeat", "seq": self.next_seq(), "uptime": 1.0,
                         "id": msg["id"]}
        elif msg["type"] == "start":
            reply = {"type": "started", "seq": self.next_seq(), "id": msg["id"], "pid": 100}
        elif msg["type"] == "probe" and self.on_probe is not None:
            reply = {"seq": self.next_seq(), **self.on_probe(msg)}
        else:
            return  # probes stay unanswered: they time out while the fuzz goes on
        # the newline first ends whatever junk line a fuzz writer left unfinished
        self.write(b"\n" + line(reply))

    def _serve(self) -> None:
        serve(self.sock, lambda item: None if isinstance(item, ProtocolError)
              else self._answer(item))


class Rig:
    def __init__(self, **limits: int) -> None:
        ours, theirs = socket.socketpair()
        self.problems: list[tuple[str, str]] = []
        self.events: list[dict[str, Any]] = []
        self.agent = Agent(theirs)
        self.agent.write(line(self.agent.hello()))
        self.link = AgentLink.from_socket(ours, zone_id="fz", on_problem=self._problem,
                                          on_event=self.events.append, heartbeat_grace=60,
                                          **limits)
        self.link.wait_hello(3)
        self.link.ping(3)
        self.rss = rss()

    def _problem(self, kind: str, detail: str) -> None:
        self.problems.append((kind, detail))

    def kinds(self) -> set[str]:
        return {k for k, _ in self.problems}

    def run(self, chunks: Iterable[bytes], timeout: float = 20) -> float:
        """Write `chunks` from a thread; seconds it took."""
        began = time.monotonic()
        writer = self.agent.feed(chunks)
        writer.join(timeout)
        assert not writer.is_alive(), "the link stopped reading"
        return time.monotonic() - began

    def settle(self) -> None:
        """Wait until the link has read everything written, let a second that flooded end
        (its input is discarded), and end a junk line left unfinished."""
        _until(lambda: self.link.health().bytes_received >= self.agent.written, 10,
               "the link to read")
        if "flood" in self.kinds():
            time.sleep(1.1)
        self.agent.write(b"\n")

    def check(self, *expected: str) -> None:
        """The link survived: alive, problems of the expected (and only known) kinds, bounded
        memory, and a ping still comes back."""
        self.settle()
        assert self.link.health().reader_alive and not self.link.closed
        assert self.link.ping(5) < 5  # and all before it has been handled
        kinds = self.kinds()
        assert set(expected) <= kinds, (expected, kinds)
        assert kinds <= KINDS, kinds - KINDS
        grown = rss() - self.rss
        assert grown < RSS_SLACK, f"RSS grew by {grown / 2**20:.1f} MiB"

    def close(self) -> None:
        self.link.close()
        self.agent.sock.shutdown(socket.SHUT_RDWR)
        self.agent.sock.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def chunked(data: bytes, rng: random.Random, most: int = 65536) -> Iterator[bytes]:
    pos = 0
    while pos < len(data):
        size = rng.randint(1, most)
        yield data[pos:pos + size]
        pos += size


# --- random input ---------------------------------------------------------------------------


def test_random_bytes(rig: Rig) -> None:
    rng = random.Random(1)
    data = rng.randbytes(4 * 1024 * 1024)
    rig.run(chunked(data, rng))
    del data
    # about 16000 lines in a few ms: the first FLOOD_MESSAGES are parsed, the rest discarded
    rig.check("malformed", "flood")
    assert rig.link.health().flood_dropped > 0
    # counted, though not reported one by one
    assert rig.link.health().problems["malformed"] >= 1000
    assert len([k for k, _ in rig.problems if k == "malformed"]) <= 4 * link_mod.PROBLEMS_PER_S


SPECIAL_JSON = [
    "1e400", "-1e400", "1" * 5000, "[" * 100_000, "[" * 900 + "]" * 900, '"\\ud800"', "NaN",
    "Infinity", "-0.0", "0e-99999", "{}", "[]", "null", "true", '""', '{"type":null}',
    '{"type":5}', '{"type":"ping"}', '{"type":"hello"}', '{"type":"x","seq":1}',
    '{"type":"heartbeat","seq":-1,"uptime":1}', '{"type":"heartbeat","seq":1e400,"uptime":1}',
    '{"type":"heartbeat","seq":1.5,"uptime":1}', '{"type":"heartbeat","seq":true,"uptime":1}',
    '{"type":"heartbeat","seq":1,"uptime":1,"type":"exit"}', '{"' + "k" * 60000 + '":1}',
]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, 1, -1, 7, 2**31, 2**63, -(2**63) - 1, 10**30, 10**4000,
                           rng.randint(-10**6, 10**6)])
    if kind == 3:
        return rng.choice([0.0, -0.0, 1.5, 1e308, -1e308, 5e-324, rng.uniform(-1e9, 1e9)])
    if kind == 4:
        return rng.choice(["", "x", "\x00", "\ud800", "é" * 100, "w1", "p1", "k1",
                           "x" * rng.randint(100, 20000)])
    if kind == 5:
        return rng.choice(IDS)
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    if kind == 7:
        return {rng.choice(["a", "id", "pid", "data", "category", ""]): random_value(rng, depth + 1)
                for _ in range(rng.randint(0, 5))}
    return "@@RAW@@"  # replaced by one of the special literals json.dumps cannot make


def dump(value: Any, rng: random.Random) -> bytes:
    text = json.dumps(value, ensure_ascii=rng.random() < 0.5)
    while '"@@RAW@@"' in text:
        raw = rng.choice(["1e400", "-1e400", "[" * 50 + "]" * 50, "1" * 4300, '"\\ud800"'])
        text = text.replace('"@@RAW@@"', raw, 1)
    return text.encode("utf-8", "surrogatepass") + b"\n"


def test_random_json_values(rig: Rig) -> None:
    rng = random.Random(2)
    lines = [s.encode() + b"\n" for s in SPECIAL_JSON]
    lines += [dump(random_value(rng), rng) for _ in range(3000)]
    # below FLOOD_MESSAGES in total: every one of them is parsed
    rig.run(chunked(b"".join(lines), rng))
    rig.check("malformed")
    assert "flood" not in rig.kinds()
    assert rig.link.health().problems["malformed"] >= len(lines) - 50


# --- every message type with its fields of the wrong type -----------------------------------

TEMPLATES: dict[str, dict[str, Any]] = {
    "hello": {"protocol": 1, "agent_version": "v", "capabilities": ["a"], "pid": 3,
              "kernel": "k", "python": "3", "boot_ms": 1, "heartbeat": 1.0, "hostname": "h",
              "port": "p", "workloads": [{"id": "w1", "pid": 100}], "id": "h1", "dropped": 0,
              "deputy": {"records": [{"seq": 1, "zone": "w1", "phase": 1, "due": 1.7e9,
                                      "started": 1.7e9, "finished": 1.7e9, "ok": True}],
                         "lost": 0, "alone_since": 1.7e9}},
    "heartbeat": {"uptime": 1.0, "id": "k1", "dropped": 0, "queued": 0},
    "started": {"id": "w1", "pid": 100,
                "standby": {"used": True, "id": "sb", "pid": 100, "prepared": 1.7e9}},
    "output": {"id": "w1", "stream": "stdout", "data": "out"},
    "exit": {"id": "w1", "status": 0},
    "probe_result": {"id": "p1", "ok": True, "result": {"a": 1}, "error": "e"},
    "error": {"message": "m", "id": "w1", "kind": "invalid"},
    "event": {"kind": "anomaly", "id": "w1", "time": 1.7e9,
              "data": {"category": "connect-out", "pid": 5, "detail": "d"}},
    "channel_send": {"id": "m1", "to": "b", "size": 3, "offset": 0, "data": "YWJj",
                     "cancel": False},
    "channel_ack": {"id": "d1"},
    "standby_ready": {"id": "sb", "pid": 100, "prepared": 1.7e9, "mode": "python"},
    "admin_result": {"id": "a1", "op": "scrub", "ok": True, "error": "e", "killed": 1,
                     "deleted": 2, "rounds": 1, "seconds": 0.1, "ipc_removed": 0, "iface": "lo",
                     "was_up": True, "path": "/", "was_ro": False, "how": "superblock",
                     "pid": 5, "limit": 10, "previous": [1, 2]},
}


def mutations(rng: random.Random, count: int) -> Iterator[dict[str, Any]]:
    types = sorted(TEMPLATES)
    for n in range(count):
        mtype = types[n % len(types)]
        msg: dict[str, Any] = {"type": mtype, "seq": n + 10, **TEMPLATES[mtype]}
        fields = [*msg, "data", "unknown_field"]
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            name = rng.choice(fields)
            if name == "seq" and rng.random() < 0.7:
                continue  # mostly sane seqs, so the handlers behind them run
            if rng.random() < 0.1:
                msg.pop(name, None)
            else:
                msg[name] = random_value(rng)
        if mtype == "event" and isinstance(msg.get("data"), dict) and rng.random() < 0.5:
            msg["data"][rng.choice(["pid", "category", "args", "time"])] = random_value(rng)
        yield msg


def test_mutated_messages_of_every_type() -> None:
    assert set(TEMPLATES) == AGENT_TYPES  # a new type needs a template here
    for mtype, fields in TEMPLATES.items():
        required, optional = SCHEMAS[mtype]
        assert set(fields) | {"seq"} >= set(required) | set(optional), mtype
    # no flood limits: every message is parsed and goes through its handler
    rig = Rig(flood_messages=10**9, flood_bytes=10**12, events_per_s=10**9)
    try:
        work = rig.link.start(["/bin/sleep", "1"], timeout=3, workload_id="w1")
        outcome: list[object] = []

        def probe() -> None:  # a request waiting while the fuzz may answer it wrongly
            try:
                outcome.append(rig.link.probe("meminfo", timeout=4))
            except ZoneError as e:
                outcome.append(e)
            except Exception as e:  # a KeyError here is what the test looks for
                outcome.append(AssertionError(f"probe raised {e!r}"))

        prober = threading.Thread(target=probe)
        prober.start()
        rng = random.Random(3)
        lines = [dump(m, rng) for m in mutations(rng, 8000)]
        rig.run(lines)
        prober.join(10)
        assert outcome and not isinstance(outcome[0], AssertionError), outcome
        rig.check("malformed")
        # what reached the handlers has the promised shape, and the workload sane values
        for event in rig.events:
            assert isinstance(event["data"], dict)
            assert "time" not in event or 0 <= event["time"] <= link_mod.MAX_EPOCH
        status = work.poll()
        assert status is None or link_mod.MIN_STATUS <= status <= link_mod.MAX_STATUS
        assert 0 <= work.pid <= link_mod.MAX_PID
        assert len(work.errors) <= link_mod.ERRORS_KEPT
        assert all(len(e) < link_mod.MAX_DETAIL + 50 for e in work.errors)
        hello = rig.link.hello
        assert hello is not None and hello.heartbeat is not None
        assert link_mod.MIN_HEARTBEAT <= hello.heartbeat <= link_mod.MAX_HEARTBEAT
    finally:
        rig.close()


# --- size and volume ------------------------------------------------------------------------


def test_a_huge_line_then_a_heartbeat(rig: Rig) -> None:
    before = rig.link.health().messages
    seq = rig.agent.next_seq()
    huge = b"a" * (link_mod.FLOOD_BYTES + 2 * 1024 * 1024)
    # the budgets are per one-second window, and the rig's setup opened one: let it end,
    # so the whole line falls into a window of its own (a window's length is what is tested)
    time.sleep(1.05)
    # past FLOOD_BYTES the link stops reading for the rest of the second: nothing is lost,
    # so the heartbeat behind the line arrives
    took = rig.run([*chunked(huge, random.Random(4)),
                    b"\n" + line({"type": "heartbeat", "seq": seq, "uptime": 2.0})])
    del huge
    _until(lambda: rig.link.health().messages > before, 5, "the heartbeat after the huge line")
    assert rig.link.health().messages == before + 1 and rig.link.health().flood_dropped == 0
    oversized = [d for k, d in rig.problems if k == "oversized"]
    assert len(oversized) == 1, rig.problems  # one line, one report
    # past the byte budget within one window, the link paused to the window's end; where
    # the line's reading spans two windows (a busy host, or a window opened by the rig's
    # own traffic), no budget is exceeded: either way the heartbeat behind it arrived and
    # nothing was lost (the assertions above)
    if "flood" in rig.kinds():
        assert took > 0.5  # it waited for the pause
    rig.check("oversized")


def heartbeats(agent: Agent, count: int) -> bytes:
    first = agent.seq + 1
    agent.seq += count
    return b"".join(b'{"type":"heartbeat","seq":%d,"uptime":1.0}\n' % (first + i)
                    for i in range(count))


def test_a_flood_of_heartbeats(rig: Rig) -> None:
    count = 200_000
    data = heartbeats(rig.agent, count)
    before = rig.link.health().messages
    began = time.monotonic()
    rig.run(data[i:i + 65536] for i in range(0, len(data), 65536))
    _until(lambda: rig.link.health().bytes_received >= rig.agent.written, 10, "the link to read")
    took = time.monotonic() - began
    parsed = rig.link.health().messages - before
    print(f"\nflood: {count} heartbeats ({len(data) / 2**20:.1f} MiB) read in {took:.2f} s "
          f"({count / took:,.0f}/s), {parsed} parsed, {rig.link.health().flood_dropped} discarded "
          f"unparsed")
    del data
    seconds = math.ceil(took) + 1  # the windows it may have touched
    assert len([k for k, _ in rig.problems if k == "flood"]) <= seconds
    assert parsed <= seconds * link_mod.FLOOD_MESSAGES
    assert rig.link.health().flood_dropped == count - parsed
    rig.check("flood", "seq_gap")  # the discarded heartbeats are a gap in seq


def test_parsing_rate_without_limits() -> None:
    """What the reader sustains when it must parse everything: a flood limit well below it
    is what keeps a flood from starving the controller."""
    rig = Rig(flood_messages=10**9, flood_bytes=10**12)
    try:
        count = 60_000
        data = heartbeats(rig.agent, count)
        before = rig.link.health().messages
        began = time.monotonic()
        rig.run(data[i:i + 65536] for i in range(0, len(data), 65536))
        del data
        _until(lambda: rig.link.health().messages - before >= count, 30, "every heartbeat parsed")
        rate = count / (time.monotonic() - began)
        print(f"\nparsing: {rate:,.0f} messages/s")
        assert rate > 2 * link_mod.FLOOD_MESSAGES
        rig.check()
        assert rig.problems == []
    finally:
        rig.close()


# --- odd bytes ------------------------------------------------------------------------------


def test_nul_bytes(rig: Rig) -> None:
    work = rig.link.start(["/bin/cat"], timeout=3, workload_id="w1")
    assert work.stdout is not None
    seq = rig.agent.next_seq
    lines = [b"\x00\n", b"\x00" * 70000 + b"\n", b'{"type":"heartbeat",\x00"seq":1,"uptime":1}\n',
             b"\x00" + line({"type": "heartbeat", "seq": 99, "uptime": 1.0}),
             line({"type": "output", "seq": seq(), "id": "w1", "stream": "stdout",
                   "data": "a\x00b"}),
             line({"type": "exit", "seq": seq(), "id": "w1", "status": 0})]
    rig.run(lines)
    assert work.wait(3) == 0
    assert work.stdout.read() == b"a\x00b"  # a NUL inside a JSON string is data
    rig.check("malformed", "oversized")
    assert rig.link.health().problems["malformed"] == 3


def test_invalid_utf8(rig: Rig) -> None:
    work = rig.link.start(["/bin/cat"], timeout=3, workload_id="w1")
    assert work.stdout is not None
    seq = rig.agent.next_seq
    bad = [b"\xff\xfe\n", b"\xc0\xaf\n", b"\xed\xa0\x80\n", b'{"type":"heartbeat\xe2\x82\n',
           b'{"type":"output","seq":1,"id":"w1","stream":"stdout","data":"\xff"}\n']
    lines = [*bad,
             # a lone surrogate written as a JSON escape is valid JSON and reaches output
             b'{"type":"output","seq":%d,"id":"w1","stream":"stdout","data":"x\\ud800y"}\n'
             % seq(),
             line({"type": "exit", "seq": seq(), "id": "w1", "status": 3})]
    rig.run(lines)
    assert work.wait(3) == 3
    assert work.stdout.read() == b"x?y"
    rig.check("malformed")
    assert rig.link.health().problems["malformed"] == len(bad)


def test_whitespace_lines(rig: Rig) -> None:
    rng = random.Random(5)
    blank = [rng.choice([b"", b" ", b"\t", b"\r", b"  \t \r", b"\x0b\x0c"]) + b"\n"
             for _ in range(3000)]
    rig.run(blank)
    rig.check()
    assert rig.problems == []  # blank lines are allowed (the agent writes one before hello)
    rig.run([b"\n" * 100_000])  # but not a hundred thousand of them in a second
    rig.check("flood")


def test_junk_then_end_of_stream() -> None:
    rig = Rig()
    rng = random.Random(6)
    rig.run(chunked(rng.randbytes(300_000), rng))
    rig.agent.sock.shutdown(socket.SHUT_WR)
    _until(lambda: not rig.link.health().reader_alive, 5, "the reader to end")
    assert rig.link.closed and rig.link.health().lost_reason
    assert {"malformed", "disconnected"} <= rig.kinds() <= KINDS
    with pytest.raises(ZoneError, match="zone fz: the guest agent link is closed"):
        rig.link.ping(1)
    rig.close()


# --- hostile but valid ----------------------------------------------------------------------


def test_implausible_hello_heartbeats(rig: Rig) -> None:
    for claim, expected in ((b"1e400", 60.0), (b"1" + b"0" * 400, 60.0), (b"-5", 0.1),
                            (b"0.000001", 0.1)):
        hello = line(rig.agent.hello()).replace(b'"heartbeat":1.0', b'"heartbeat":' + claim)
        rig.run([hello])
        _until(lambda e=expected: rig.link.hello is not None and rig.link.hello.heartbeat == e,
               3, f"heartbeat {expected}")
    rig.check("malformed")
    assert all("heartbeat period" in d for k, d in rig.problems if k == "malformed")


def test_a_seq_beyond_any_counter_is_discarded(rig: Rig) -> None:
    rig.run([line({"type": "heartbeat", "seq": 10**100, "uptime": 1.0}),
             line({"type": "heartbeat", "seq": rig.agent.next_seq(), "uptime": 1.0})])
    rig.check("malformed")
    assert "seq_regress" not in rig.kinds()  # the huge seq was not taken as the last one


def test_a_reply_of_the_wrong_type_fails_the_request(rig: Rig) -> None:
    rig.agent.on_probe = lambda msg: {"type": "heartbeat", "uptime": 1.0, "id": msg["id"]}
    with pytest.raises(ZoneError, match="answered with a heartbeat message instead"):
        rig.link.probe("meminfo", timeout=3)
    rig.check("malformed")


def test_impossible_pids_and_statuses(rig: Rig) -> None:
    work = rig.link.start(["/bin/true"], timeout=3, workload_id="w1")
    seq = rig.agent.next_seq
    rig.run([line({"type": "started", "seq": seq(), "id": "w1", "pid": -1}),
             line({"type": "exit", "seq": seq(), "id": "w1", "status": 10**20}),
             line({"type": "exit", "seq": seq(), "id": "w1", "status": 0})])
    assert work.wait(3) == link_mod.MAX_STATUS  # the first exit stands
    assert work.pid == 100  # the first started stands
    rig.check("malformed")
    details = " ".join(d for k, d in rig.problems if k == "malformed")
    assert "second started" in details and "status 100000000000000000000" in details


def test_errors_are_bounded(rig: Rig) -> None:
    work = rig.link.start(["/bin/true"], timeout=3, workload_id="w1")
    rig.run([line({"type": "error", "seq": rig.agent.next_seq(), "id": "w1",
                   "message": f"{i} " + "e" * 5000}) for i in range(500)])
    _until(lambda: rig.link.health().problems.get("agent_error") == 500, 3, "500 agent errors")
    assert len(work.errors) == link_mod.ERRORS_KEPT and work.errors[0].startswith("499 ")
    assert max(len(e) for e in work.errors) < link_mod.MAX_DETAIL + 50
    rig.check("agent_error")
    assert len([k for k, _ in rig.problems if k == "agent_error"]) <= 2 * (
        link_mod.PROBLEMS_PER_S + 1)


def test_problems_are_rate_limited_and_summed_up(rig: Rig) -> None:
    rig.run([b"junk\n" * 1000])
    _until(lambda: any("more malformed" in d for _, d in rig.problems), 3, "the summary")
    reported = [d for k, d in rig.problems if k == "malformed"]
    assert len(reported) == link_mod.PROBLEMS_PER_S + 1
    assert reported[-1].startswith(f"{1000 - link_mod.PROBLEMS_PER_S} more malformed")
    assert rig.link.health().problems["malformed"] == 1000 == rig.link.health().malformed
    rig.check()


def test_events_beyond_the_cap_are_dropped(rig: Rig) -> None:
    seq = rig.agent.next_seq
    rig.run([b"".join(line({"type": "event", "seq": seq(), "kind": "stats",
                            "data": {"n": i}}) for i in range(1000)),
             line({"type": "event", "seq": seq(), "kind": "anomaly", "time": 1.7e9}),
             b'{"type":"event","seq":%d,"kind":"x","time":1e400}\n' % seq()])
    _until(lambda: len(rig.events) + rig.link.health().events_dropped == 1002, 3, "every event")
    # the writes fall into one second, or at most two
    assert rig.link.health().events_dropped >= 1002 - 2 * link_mod.EVENTS_PER_S
    assert 1 <= len([k for k, _ in rig.problems if k == "events_dropped"]) <= 2
    assert all(isinstance(e["data"], dict) for e in rig.events)
    rig.check("events_dropped")


def test_floods_of_unknown_ids_and_hellos(rig: Rig) -> None:
    seq = rig.agent.next_seq
    kinds = [lambda i: {"type": "probe_result", "id": f"p{i}", "ok": False, "error": "e"},
             lambda i: {"type": "output", "id": f"u{i}", "stream": "stdout", "data": "x" * 500},
             lambda i: {"type": "exit", "id": f"u{i}", "status": 1},
             lambda i: {"type": "started", "id": f"u{i}", "pid": 5}]
    lines = [line({**make(i), "seq": seq()}) for i in range(1200) for make in kinds]
    # hellos again and again, every other one as from a restarted agent
    lines += [line(rig.agent.hello(seq=0 if i % 2 else seq())) for i in range(2000)]
    rig.run(lines)
    rig.check("agent_restart")
    assert rig.link._workloads.unclaimed <= link_mod.UNCLAIMED_KEEP
    assert len([k for k, _ in rig.problems if k == "agent_restart"]) <= 3 * (
        link_mod.PROBLEMS_PER_S + 1)


def test_handler_failures_are_contained(caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig()
    calls = {"problem": 0, "event": 0}

    def bad_problem(kind: str, detail: str) -> None:
        calls["problem"] += 1
        raise RuntimeError("handler bug")

    def bad_event(msg: dict[str, Any]) -> None:
        calls["event"] += 1
        raise RuntimeError("handler bug")

    rig.link.on_problem, rig.link.on_event = bad_problem, bad_event
    try:
        with caplog.at_level(logging.ERROR, logger="hvtsm.monitor.link"):
            rig.run([b"junk\n" * 50, b"".join(line({"type": "event", "seq": rig.agent.next_seq(),
                                                    "kind": "stats"}) for _ in range(100))])
            assert rig.link.ping(3) < 3
        assert calls["event"] == 100 and calls["problem"] >= link_mod.PROBLEMS_PER_S
        assert rig.link.health().reader_alive
        # the log keeps the 1st, 2nd, 4th ... failure of each handler, not all of them
        assert len(caplog.records) <= 2 * (math.log2(100) + 1)
    finally:
        rig.close()


def test_an_exit_lost_in_a_flood_is_found(rig: Rig) -> None:
    ended = rig.link.start(["/bin/true"], timeout=3)
    running = rig.link.start(["/bin/sleep", "100"], timeout=3)
    rig.agent.running = [{"id": running.id, "pid": 100}]
    # the exit comes behind more lines than a second may bring: it is discarded unparsed
    rig.run([b"junk\n" * (link_mod.FLOOD_MESSAGES + 100)
             + line({"type": "exit", "seq": rig.agent.next_seq(), "id": ended.id,
                     "status": 0})])
    # once the second is over the link asks for a hello, which no longer lists it
    assert ended.wait(4) == link_mod.MAX_STATUS
    assert ended.exit_lost and "discarded in a flood" in ended.errors[0]
    assert running.poll() is None and not running.exit_lost
    assert any(k == "flood" and f"exit of {ended.id}" in d for k, d in rig.problems)
    rig.check("flood")
