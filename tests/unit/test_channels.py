"""The broker's logic (hvtsm/channels): grants, phases, sizes, rates, reassembly bounds and
hostile pieces, held messages, ended receivers, and the audit rows, against a real SQLite
store and a recording stand-in for the agent links."""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from guest_agent.protocol import CHANNEL_PIECE_BYTES, channel_pieces
from hvtsm.channels import reassembly
from hvtsm.channels.broker import HELD_MESSAGES, Broker
from hvtsm.channels.grants import TokenBucket, decide
from hvtsm.channels.reassembly import Reassembler
from hvtsm.errors import ZoneError
from hvtsm.monitor.anomalies import AnomalyReport
from hvtsm.monitor.link import ChannelFault
from hvtsm.policy.loader import parse_policy
from hvtsm.policy.model import ChannelGrant
from hvtsm.store import Store
from hvtsm.store.audit import zone_trail
from hvtsm.store.models import ChannelMessage

# --- grants ---------------------------------------------------------------------------------


def test_one_way_grant_allows_only_its_direction() -> None:
    grants = [ChannelGrant("fetch", "parse")]
    assert decide(grants, sender="fetch", receiver="parse", phase=0, size=10).refusal is None
    back = decide(grants, sender="parse", receiver="fetch", phase=0, size=10)
    assert back.refusal == "no channel from parse to fetch is granted"
    assert decide(grants, sender="fetch", receiver="other", phase=0, size=1).refusal


def test_both_ways_grant_and_self() -> None:
    grants = [ChannelGrant("a", "b", both=True)]
    assert decide(grants, sender="b", receiver="a", phase=0, size=1).refusal is None
    assert decide(grants, sender="a", receiver="a", phase=0, size=1).refusal == \
        "a zone cannot send to itself"


def test_size_limit_is_the_grants() -> None:
    grants = [ChannelGrant("a", "b", max_message=100)]
    assert decide(grants, sender="a", receiver="b", phase=0, size=100).refusal is None
    refusal = decide(grants, sender="a", receiver="b", phase=0, size=101).refusal
    assert refusal == "101 bytes exceed the channel's max_message of 100 bytes"


def test_phases_are_the_senders() -> None:
    grants = [ChannelGrant("a", "b", phases=(0, 1))]
    assert decide(grants, sender="a", receiver="b", phase=1, size=1).refusal is None
    closed = decide(grants, sender="a", receiver="b", phase=2, size=1).refusal
    assert closed is not None and "closed in phase 2" in closed and "0, 1" in closed
    assert "no phase yet" in str(decide(grants, sender="a", receiver="b", phase=-1,
                                        size=1).refusal)


def test_token_bucket_keeps_to_the_rate() -> None:
    bucket = TokenBucket(10.0, now=0.0)
    taken = sum(bucket.take(0.0) for _ in range(50))
    assert taken == 10  # a second's worth at once
    assert not bucket.take(0.05)
    assert bucket.take(0.1)  # one more token after 1/10 s
    slow = TokenBucket(0.5, now=0.0)
    assert slow.take(0.0) and not slow.take(1.0) and slow.take(2.0)


def test_loader_builds_grants_and_names_channel_refused() -> None:
    policy = parse_policy(b'''
name = "p"
[[phase]]
at = "0s"
network = "full"
[[phase]]
at = "5s"
network = "none"
[anomaly]
on = { "channel-refused" = "terminate" }
[[channel]]
from = "fetch"
to = "parse"
max_message = "1KiB"
max_rate = 5
phases = [0]
audit_content = true
''', source="p.toml")
    grant = policy.grant_for("fetch", "parse")
    assert grant is not None and grant.max_message == 1024 and grant.phases == (0,)
    assert policy.grant_for("parse", "fetch") is None
    assert str(policy.anomaly.reaction_for("channel-refused", 1)) == "terminate"


# --- reassembly -----------------------------------------------------------------------------


def pieces(mid: str, to: str, data: bytes) -> list[dict[str, Any]]:
    return list(channel_pieces("channel_send", mid, "to", to, data))


def admit_all(_to: str, _size: int) -> tuple[Any, str | None]:
    return "ticket", None


def feed(r: Reassembler, msgs: list[dict[str, Any]], admit: Any = admit_all,
         now: float = 0.0) -> list[reassembly.Finished]:
    out = []
    for msg in msgs:
        out += r.piece(msg, admit, now)
    return out


def test_pieces_in_order_come_back_whole_with_their_digest() -> None:
    data = bytes(range(256)) * 700  # several pieces
    msgs = pieces("m1", "b", data)
    assert len(msgs) == -(-len(data) // CHANNEL_PIECE_BYTES)
    r = Reassembler()
    done = feed(r, msgs)
    assert len(done) == 1 and done[0].refusal is None and done[0].fault is None
    assert done[0].data == data and done[0].digest == hashlib.sha256(data).hexdigest()
    assert done[0].ticket == "ticket" and r.unfinished == 0


def test_empty_message_is_one_piece() -> None:
    done = feed(Reassembler(), pieces("m1", "b", b""))
    assert done[0].data == b"" and done[0].refusal is None


def test_refused_at_first_piece_is_hashed_never_buffered() -> None:
    data = b"x" * (CHANNEL_PIECE_BYTES * 3)
    r = Reassembler()
    msgs = pieces("m1", "b", data)
    assert r.piece(msgs[0], lambda _t, _s: (None, "too big"), 0.0) == []
    assert r.buffered == 0 and r.unfinished == 1
    done = feed(r, msgs[1:])
    assert done[0].refusal == "too big" and done[0].data is None
    assert done[0].digest == hashlib.sha256(data).hexdigest()


def test_hostile_wrong_order_is_a_fault_and_the_rest_is_skipped() -> None:
    msgs = pieces("m1", "b", b"y" * (CHANNEL_PIECE_BYTES * 3))
    r = Reassembler()
    done = feed(r, [msgs[0], msgs[2]])
    assert done[0].fault and "out of order" in done[0].fault
    assert done[0].refusal.startswith("malformed") and done[0].ticket == "ticket"
    assert feed(r, [msgs[1]]) == []  # a later piece of the dead message: skipped quietly
    assert r.unfinished == 0 and r.buffered == 0


def test_hostile_piece_of_a_message_never_begun() -> None:
    msgs = pieces("m7", "b", b"z" * (CHANNEL_PIECE_BYTES * 3))
    r = Reassembler()
    done = feed(r, [msgs[1]])
    assert done[0].fault and "never began" in done[0].fault and done[0].ticket is None
    assert feed(r, [msgs[2]]) == []


def test_hostile_piece_beyond_the_declared_size() -> None:
    first = pieces("m1", "b", b"a" * 10)[0]
    r = Reassembler()
    first["size"] = 20
    assert feed(r, [first]) == []
    extra = dict(first, offset=10, data=base64.b64encode(b"b" * 11).decode())
    done = feed(r, [extra])
    assert done[0].fault and "beyond its declared size" in done[0].fault
    assert r.buffered == 0


def test_hostile_bad_base64() -> None:
    msg = pieces("m1", "b", b"abc")[0]
    msg["data"] = "!!not base64!!"
    done = feed(Reassembler(), [msg])
    assert done[0].fault and "not base64" in done[0].fault


def test_hostile_begun_twice_and_receiver_changed() -> None:
    msgs = pieces("m1", "b", b"q" * (CHANNEL_PIECE_BYTES * 2))
    r = Reassembler()
    feed(r, [msgs[0]])
    done = feed(r, [msgs[0]])
    assert done[0].fault and "second time" in done[0].fault
    r2 = Reassembler()
    feed(r2, [msgs[0]])
    done = feed(r2, [dict(msgs[1], to="other")])
    assert done[0].fault and "another receiver" in done[0].fault


def test_hostile_never_finished_is_given_up() -> None:
    msgs = pieces("m1", "b", b"w" * (CHANNEL_PIECE_BYTES * 2))
    r = Reassembler(timeout=30)
    feed(r, msgs[:1], now=100.0)
    assert r.expire(120.0) == []
    done = r.expire(131.0)
    assert done[0].fault and "never finished" in done[0].fault
    assert r.unfinished == 0 and r.buffered == 0


def test_unfinished_messages_are_bounded() -> None:
    r = Reassembler(max_unfinished=2, max_buffered=10**9, max_discarding=1)
    big = b"e" * (CHANNEL_PIECE_BYTES * 2)
    for mid in ("m1", "m2"):
        assert feed(r, pieces(mid, "b", big)[:1]) == []
    # a third one is refused, but still streams past (hashed) to its end
    assert feed(r, pieces("m3", "b", big)[:1]) == []
    assert r.unfinished == 3 and r.buffered == 2 * len(big)
    # a fourth has nowhere to go: a fault at once
    done = feed(r, pieces("m4", "b", big)[:1])
    assert done[0].fault and "still streaming" in done[0].fault
    done = feed(r, pieces("m3", "b", big)[1:])
    assert done[0].refusal and "too many unfinished" in done[0].refusal


def test_declared_bytes_are_bounded_before_anything_is_kept() -> None:
    r = Reassembler(max_buffered=100)
    first = pieces("m1", "b", b"a" * 10)[0]
    first["size"] = 10**9  # a hostile declared size
    feed(r, [first])
    assert r.buffered == 0  # refused: too many bytes declared, nothing buffered


def test_cancel_ends_a_message() -> None:
    msgs = pieces("m1", "b", b"c" * (CHANNEL_PIECE_BYTES * 2))
    r = Reassembler()
    feed(r, msgs[:1])
    done = feed(r, [dict(msgs[1], data="", cancel=True)])
    assert done[0].refusal == "the sender cancelled the message" and done[0].fault is None
    lone = dict(msgs[0], data="", cancel=True, size=10**8)
    done = feed(Reassembler(), [lone], admit=lambda _t, s: (None, f"{s} too big"))
    assert done[0].refusal == "100000000 too big"


# --- the broker -----------------------------------------------------------------------------


class FakeLink:
    """What the broker writes to one zone's agent link, and what it reports as bad."""

    def __init__(self) -> None:
        self.delivered: list[tuple[str, str, bytes]] = []
        self.verdicts: list[tuple[str, str, str]] = []
        self.bad: list[str] = []
        self.closed = False
        self.fail = False

    def channel_deliver(self, did: str, sender: str, data: bytes, *,
                        timeout: float = 30) -> None:
        if self.fail:
            raise ZoneError("the link is gone")
        self.delivered.append((did, sender, data))

    def channel_verdict(self, mid: str, verdict: str, reason: str, *,
                        timeout: float = 10) -> None:
        self.verdicts.append((mid, verdict, reason))

    def report_bad(self, detail: str) -> None:
        self.bad.append(detail)


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.store = Store(f"sqlite:///{tmp / 'ch.db'}")
        self.links: dict[str, FakeLink] = {}
        self.anomalies: list[tuple[str, AnomalyReport]] = []
        self.broker = Broker(self.store, link_of=self.links.get,
                             anomaly=lambda z, r: self.anomalies.append((z, r)))
        self._mids = 0

    def zone(self, zone_id: str, name: str, group: str | None = "g",
             grants: tuple[ChannelGrant, ...] = (), phase: int = 0,
             start: bool = True) -> FakeLink:
        self.links[zone_id] = FakeLink()
        self.broker.register(zone_id, name=name, group=group, grants=grants, phase=phase)
        if start:
            self.broker.started(zone_id)
        return self.links[zone_id]

    def send(self, zone_id: str, to: str, data: bytes) -> str:
        self._mids += 1
        mid = f"m{self._mids}"
        for msg in channel_pieces("channel_send", mid, "to", to, data):
            self.broker.on_message(zone_id, msg)
        return mid

    def verdict(self, zone_id: str, mid: str) -> tuple[str, str]:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            self.broker.settle()
            for m, verdict, reason in self.links[zone_id].verdicts:
                if m == mid:
                    return verdict, reason
            time.sleep(0.01)
        raise AssertionError(f"no verdict for {mid}")

    def rows(self) -> list[ChannelMessage]:
        self.broker.settle()
        with self.store.session() as s:
            return list(s.exec(select(ChannelMessage).order_by(ChannelMessage.id)).all())

    def close(self) -> None:
        self.broker.close()
        self.store.dispose()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def test_granted_message_is_delivered_and_audited_without_content(rig: Rig) -> None:
    rig.broker.open_group("g", ["a", "b"], [ChannelGrant("a", "b")])
    rig.zone("za", "a")
    b = rig.zone("zb", "b")
    mid = rig.send("za", "b", b"payload")
    assert rig.verdict("za", mid) == ("delivered", "delivered")
    assert [(s, d) for _, s, d in b.delivered] == [("a", b"payload")]
    row = rig.rows()[0]
    assert (row.sender_zone, row.sender_name, row.receiver_zone, row.receiver_name) == \
        ("za", "a", "zb", "b")
    assert row.size == 7 and row.digest == hashlib.sha256(b"payload").hexdigest()
    assert row.verdict == "delivered" and row.content is None and row.group_id == "g"
    assert rig.anomalies == []


def test_refusals_are_audited_and_raised_as_anomalies(rig: Rig) -> None:
    rig.broker.open_group("g", ["a", "b"], [ChannelGrant("a", "b", max_message=10)])
    rig.zone("za", "a")
    rig.zone("zb", "b")
    cases = [("zb", "a", b"back", "no channel from b to a is granted"),
             ("za", "nobody", b"x", "no zone named nobody in channel group g"),
             ("za", "b", b"x" * 11, "11 bytes exceed the channel's max_message of 10 bytes")]
    for zone, to, data, reason in cases:
        mid = rig.send(zone, to, data)
        assert rig.verdict(zone, mid) == ("refused", reason)
    rows = rig.rows()
    assert [r.verdict for r in rows] == ["refused"] * 3
    assert rows[0].digest == hashlib.sha256(b"back").hexdigest() and rows[0].content is None
    assert rows[2].size == 11
    assert [z for z, _ in rig.anomalies] == ["zb", "za", "za"]
    assert {r.category for _, r in rig.anomalies} == {"channel-refused"}
    assert rig.anomalies[0][1].evidence["to"] == "a"


def test_phase_in_force_closes_the_channel(rig: Rig) -> None:
    rig.broker.open_group("g", ["a", "b"], [ChannelGrant("a", "b", phases=(0,))])
    rig.zone("za", "a")
    rig.zone("zb", "b")
    assert rig.verdict("za", rig.send("za", "b", b"early"))[0] == "delivered"
    rig.broker.phase("za", 1)
    verdict, reason = rig.verdict("za", rig.send("za", "b", b"late"))
    assert verdict == "refused" and "closed in phase 1" in reason
    assert rig.rows()[-1].sender_phase == 1


def test_rate_limit_per_direction(rig: Rig) -> None:
    rig.broker.open_group("g", ["a", "b"], [ChannelGrant("a", "b", both=True, max_rate=3)])
    rig.zone("za", "a")
    rig.zone("zb", "b")
    verdicts = [rig.verdict("za", rig.send("za", "b", b"m"))[0] for _ in range(5)]
    assert verdicts == ["delivered"] * 3 + ["refused"] * 2
    # the other direction has its own bucket
    assert rig.verdict("zb", rig.send("zb", "a", b"m"))[0] == "delivered"
    assert "rate limit of 3 messages/s" in rig.rows()[3].reason


def test_audit_content_keeps_the_bytes(rig: Rig) -> None:
    rig.broker.open_group("g", ["a", "b"], [ChannelGrant("a", "b", audit_content=True)])
    rig.zone("za", "a")
    rig.zone("zb", "b")
    rig.verdict("za", rig.send("za", "b", b"keep me"))
    assert rig.rows()[0].content == b"keep me"
    with rig.store.session() as s:
        trail = zone_trail(s, zone_id="zb")
    entry = next(e for e in trail if e.kind == "channel")
    assert "keep me" in entry.summary
    assert base64.b64decode(entry.data["content_base64"]) == b"keep me"


def test_held_until_the_receiver_starts_then_delivered(rig: Rig) -> None:
    rig.broker.open_group("g", ["a", "b"], [ChannelGrant("a", "b")])
    rig.zone("za", "a")
    mid = rig.send("za", "b", b"early bird")  # b not even registered yet
    verdict, reason = rig.verdict("za", mid)
    assert verdict == "delivered" and "has not started" in reason
    b = rig.zone("zb", "b", start=False)
    rig.broker.settle()
    assert b.delivered == []
    rig.broker.started("zb")
    rig.broker.settle()
    assert [d for _, _, d in b.delivered] == [b"early bird"]
    assert [r.verdict for r in rig.rows()] == ["held", "delivered"]
    assert rig.rows()[1].receiver_zone == "zb"


def test_backlog_is_bounded_and_acks_free_it(rig: Rig) -> None:
    rig.broker.open_group("g", ["a", "b"], [ChannelGrant("a", "b", max_rate=10**6)])
    rig.zone("za", "a")
    verdicts = [rig.verdict("za", rig.send("za", "b", b"h"))[0]
                for _ in range(HELD_MESSAGES + 1)]
    assert verdicts.count("delivered") == HELD_MESSAGES  # all held
    assert "receiver backlog full" in rig.rows()[-1].reason
    b = rig.zone("zb", "b")
    rig.broker.settle()
    assert len(b.delivered) == HELD_MESSAGES
    # delivered but not taken still counts; the agent's acks free the backlog
    assert rig.verdict("za", rig.send("za", "b", b"h"))[0] == "refused"
    for did, _, _ in b.delivered[:2]:
        rig.broker.on_message("zb", {"type": "channel_ack", "id": did})
    assert rig.verdict("za", rig.send("za", "b", b"h"))[0] == "delivered"
    with pytest.raises(ChannelFault, match="not waiting"):
        rig.broker.on_message("zb", {"type": "channel_ack", "id": "d999999"})


def test_receiver_ended_drops_held_and_refuses_more(rig: Rig) -> None:
    rig.broker.open_group("g", ["a", "b"], [ChannelGrant("a", "b")])
    rig.zone("za", "a")
    rig.zone("zb", "b", start=False)
    rig.verdict("za", rig.send("za", "b", b"never read"))
    rig.broker.ended("zb")
    verdict, reason = rig.verdict("za", rig.send("za", "b", b"too late"))
    assert (verdict, reason) == ("refused", "receiver ended")
    rows = rig.rows()
    assert [(r.verdict, r.reason) for r in rows] == [
        ("held", "b has not started: delivered when it does"),
        ("refused", "receiver ended"), ("refused", "receiver ended")]
    assert rows[1].digest == hashlib.sha256(b"never read").hexdigest()


def test_receiver_link_failure_refuses(rig: Rig) -> None:
    rig.broker.open_group("g", ["a", "b"], [ChannelGrant("a", "b")])
    rig.zone("za", "a")
    rig.zone("zb", "b").fail = True
    verdict, reason = rig.verdict("za", rig.send("za", "b", b"x"))
    assert verdict == "refused" and "could not be written" in reason


def test_membership_rules(rig: Rig) -> None:
    rig.broker.open_group("g", ["a", "b"], [])
    with pytest.raises(ZoneError, match="not a member"):
        rig.zone("zc", "c")
    rig.zone("za", "a")
    with pytest.raises(ZoneError, match="already runs"):
        rig.zone("za2", "a")
    with pytest.raises(ZoneError, match="open already"):
        rig.broker.open_group("g", ["a"], [])
    rig.broker.close_group("g")
    verdict, reason = rig.verdict("za", rig.send("za", "b", b"x"))
    assert verdict == "refused" and "closed" in reason


def test_lone_named_zone_gets_a_group_from_its_policy(rig: Rig) -> None:
    grants = (ChannelGrant("solo", "peer"),)
    rig.zone("zs", "solo", group="auto", grants=grants)
    peer = rig.zone("zp", "peer", group="auto")  # joins; its own policy grants nothing more
    assert rig.verdict("zs", rig.send("zs", "peer", b"hi"))[0] == "delivered"
    rig.broker.settle()
    assert peer.delivered[0][2] == b"hi"
    assert rig.verdict("zp", rig.send("zp", "solo", b"no"))[0] == "refused"
    # without a group at all the zone is alone: nothing to send to
    rig.zone("zl", "lonely", group=None, grants=grants)
    verdict, reason = rig.verdict("zl", rig.send("zl", "peer", b"x"))
    assert verdict == "refused" and "no channel" in reason


def test_hostile_pieces_through_the_broker_are_faults_and_refusals(rig: Rig) -> None:
    rig.broker.open_group("g", ["a", "b"], [ChannelGrant("a", "b")])
    rig.zone("za", "a")
    b = rig.zone("zb", "b")
    msgs = list(channel_pieces("channel_send", "m1", "to", "b", b"k" * (CHANNEL_PIECE_BYTES * 3)))
    rig.broker.on_message("za", msgs[0])
    with pytest.raises(ChannelFault, match="out of order"):
        rig.broker.on_message("za", msgs[2])
    assert rig.verdict("za", "m1")[0] == "refused"
    bad = dict(next(channel_pieces("channel_send", "m2", "to", "b", b"abc")), data="@@@@")
    with pytest.raises(ChannelFault, match="not base64"):
        rig.broker.on_message("za", bad)
    rig.broker.settle()
    assert b.delivered == []
    # faults are the link's anomalies (malformed-message), not channel-refused ones
    assert rig.anomalies == []
    with pytest.raises(ChannelFault, match="has no channel"):
        rig.broker.on_message("zunknown", msgs[0])


def test_never_finished_message_is_given_up_by_the_janitor(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    rig.broker.open_group("g", ["a", "b"], [ChannelGrant("a", "b")])
    rig.zone("za", "a")
    rig.zone("zb", "b")
    member = rig.broker._members["za"]
    member.reassembler.timeout = 0.5
    first = next(channel_pieces("channel_send", "m1", "to", "b", b"n" * (CHANNEL_PIECE_BYTES * 2)))
    rig.broker.on_message("za", first)
    verdict, reason = rig.verdict("za", "m1")
    assert verdict == "refused" and "never finished" in reason
    deadline = time.monotonic() + 3
    while not rig.links["za"].bad and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rig.links["za"].bad and "never finished" in rig.links["za"].bad[0]
    # its reservation was given back: the backlog is empty again
    assert rig.broker._groups["g"].load == {}


def test_concurrent_senders_keep_the_books_straight(rig: Rig) -> None:
    rig.broker.open_group("g", ["a", "b", "c"], [ChannelGrant("a", "c", max_rate=10**6),
                                                 ChannelGrant("b", "c", max_rate=10**6)])
    rig.zone("za", "a")
    rig.zone("zb", "b")
    c = rig.zone("zc", "c")

    def burst(zone: str) -> None:
        for i in range(20):
            rig.send(zone, "c", f"{zone}-{i}".encode())

    threads = [threading.Thread(target=burst, args=(z,)) for z in ("za", "zb")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rig.broker.settle()
    assert len(c.delivered) == 40
    assert sorted(d for _, _, d in c.delivered if d.startswith(b"za")) == sorted(
        f"za-{i}".encode() for i in range(20))
    assert len(rig.rows()) == 40


def test_ack_before_the_outlet_audited_still_gives_a_verdict(rig: Rig) -> None:
    """A fast receiver acknowledges while the broker is still finishing the write: the
    message must still be audited and its sender told (a lost verdict hangs the sender)."""
    rig.broker.open_group("g", ["a", "b"], [ChannelGrant("a", "b")])
    rig.zone("za", "a")
    b = rig.zone("zb", "b")
    plain = b.channel_deliver

    def deliver_and_ack(did: str, sender: str, data: bytes, *, timeout: float = 30) -> None:
        plain(did, sender, data, timeout=timeout)
        rig.broker.on_message("zb", {"type": "channel_ack", "id": did})

    b.channel_deliver = deliver_and_ack  # type: ignore[method-assign]
    for i in range(5):
        assert rig.verdict("za", rig.send("za", "b", f"fast {i}".encode()))[0] == "delivered"
    assert [r.verdict for r in rig.rows()] == ["delivered"] * 5
    assert rig.broker._groups["g"].load == {}
