"""The link's parts on their own, by an explicit clock: the flood budgets' shared one-second
windows, the problem reports per kind, and where a link's budgets come from."""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass, field

import pytest

import hvtsm.monitor.link as link_pkg
from hvtsm.monitor.link import AgentLink, Limits
from hvtsm.monitor.link.flood import FloodControl, Mode
from hvtsm.monitor.link.problems import FailureLog, ProblemLog


def test_a_flood_of_lines_discards_the_rest_of_the_second() -> None:
    flood = FloodControl(Limits(flood_messages=3))
    assert flood.roll(10.0) is Mode.READ  # the first window opens at the first look
    got = flood.admit(b"a\nb\nc\nd\ne\n", 10.0, mid_line=False)
    assert got.keep == b"a\nb\nc\n" and got.cut
    assert got.flood is not None and "5 lines and 10 bytes" in got.flood
    assert flood.mode is Mode.DISCARD
    assert flood.roll(10.5) is None
    assert flood.admit(b"x\ny", 10.5, mid_line=False).keep == b""
    assert flood.roll(11.0) is Mode.DISCARD  # over: the caller asks whose exit was lost
    # the discarding stopped inside a line: its rest is junk, not a line of its own
    assert flood.admit(b"z\nok\n", 11.0, mid_line=False).keep == b"ok\n"
    assert (flood.dropped_lines, flood.dropped_bytes) == (4, 9)


def test_too_many_bytes_pause_reading_until_the_second_is_over() -> None:
    flood = FloodControl(Limits(flood_bytes=10))
    flood.roll(0.0)
    got = flood.admit(b"x" * 11 + b"\n", 0.2, mid_line=False)
    assert got.keep == b"x" * 11 + b"\n" and not got.cut  # nothing is lost
    assert got.flood is not None and "nothing more is read" in got.flood
    assert flood.paused and flood.paused_ms(0.5) == 501
    assert flood.paused_ms(1.0) is None
    assert flood.roll(1.0) is Mode.PAUSE and not flood.paused


def test_events_and_channel_lines_have_budgets_of_their_own() -> None:
    flood = FloodControl(Limits(flood_messages=1, events_per_s=2, channel_lines_per_s=2))
    flood.roll(0.0)
    channel = b'{"type":"channel_ack"}\n' * 2
    assert flood.admit(channel + b"e\n", 0.0, mid_line=False).flood is None
    verdicts = [flood.admit_event(0.1) for _ in range(4)]
    assert [v.passed for v in verdicts] == [True, True, False, False]
    assert verdicts[2].report is not None and verdicts[3].report is None  # once a second
    assert flood.events_dropped == 2
    flood.roll(1.0)  # the four budgets open again together
    assert flood.admit_event(1.0).passed
    over = flood.admit(channel * 2, 1.0, mid_line=False)
    assert over.keep == b"" and over.cut  # which lines were the channel's is unknown


@dataclass
class Handlers:
    reports: list[tuple[str, str]] = field(default_factory=list)

    def on_problem(self, kind: str, detail: str) -> None:
        self.reports.append((kind, detail))

    on_event = None
    on_channel = None


def test_problems_are_limited_per_kind_and_summed_up() -> None:
    handlers = Handlers()
    problems = ProblemLog("z", handlers, 2, FailureLog("z"))  # type: ignore[arg-type]
    for i in range(5):
        problems.problem("malformed", f"bad {i}")
    problems.problem("seq_gap", "one")
    assert handlers.reports == [("malformed", "bad 0"), ("malformed", "bad 1"),
                                ("seq_gap", "one")]
    problems.flush(math.inf)
    assert handlers.reports[-1] == ("malformed", "3 more malformed problem(s) within one "
                                    "second, counted but not reported one by one (the "
                                    "last: bad 4)")
    assert problems.counts == {"malformed": 5, "seq_gap": 1}
    problems.flush(math.inf)
    assert len(handlers.reports) == 4  # a sum is reported once


def test_a_links_budgets_are_the_constants_as_they_stand(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(link_pkg, "FLOOD_MESSAGES", 7)
    monkeypatch.setattr(link_pkg, "PROBLEMS_PER_S", 3)
    links = []
    for given in (None, 9):
        ours, theirs = socket.socketpair()
        links.append((AgentLink.from_socket(ours, flood_messages=given), theirs))
    try:
        assert links[0][0].limits == Limits(flood_messages=7, problems_per_s=3)
        assert links[1][0].limits.flood_messages == 9  # a keyword wins
    finally:
        for link, theirs in links:
            link.close()
            theirs.close()
