"""The broker: the only way a message gets from one zone to another.

Zones are addressed by name within their group (`ZoneRun.name`, `.group`). A group is opened
with its members and grants (`open_group`, by whoever makes a pipeline), or opened by the
manager for a zone launched with a name into no open group (a group of its own making, from
that zone's policy's grants, which later zones of the same group name join).

A message arrives in pieces over the sender's agent link (`on_message`, the link's reader
thread); at its first piece it is judged (`_admit`): the receiver must be a member, a grant
must join the two names in that direction, the channel must be open in the sender's phase
in force, the declared size within the grant's max_message, the receiver not ended and its
backlog (held + delivered but not yet taken, HELD_MESSAGES / HELD_BYTES) not full, and the
grant's rate (a token bucket per direction) not exceeded. Only then are its bytes kept
(reassembly.py). Complete, it is delivered to the receiver's agent, or held while the
receiver has not started and delivered when it does.

Every message and every refusal becomes a `channel_message` row (audit.py) before anything
is said about it: the sender's verdict is sent after its row is written. A refusal is also
an anomaly (`channel-refused`) of the sender, whose own policy decides the reaction; faults
(malformed pieces) are anomalies through the sender's link instead. Writes to links and the
store happen on one *outlet* thread per zone, never on a link's reader thread, in order: a
zone's deliveries and verdicts keep their order, and one slow guest holds up only itself.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from guest_agent.protocol import Message
from hvtsm.channels.audit import ChannelRecord, record_channel_message
from hvtsm.channels.grants import TokenBucket, decide
from hvtsm.channels.reassembly import Finished, Reassembler
from hvtsm.errors import HvtsmError, ZoneError
from hvtsm.monitor.anomalies import AnomalyReport
from hvtsm.monitor.link import AgentLink, ChannelFault
from hvtsm.policy.model import ChannelGrant
from hvtsm.store import Store

log = logging.getLogger(__name__)

#: messages / bytes that may wait for one receiver (held before it starts, or delivered to
#: its agent and not taken yet); the agent's inbox has the same bounds
HELD_MESSAGES = 64
HELD_BYTES = 16 * 1024 * 1024
#: how long writing one delivery to a receiver's link may take
DELIVER_TIMEOUT = 30.0
#: the anomaly category of a refusal (a host-side category policies can name in `on`)
REFUSED = "channel-refused"

LinkOf = Callable[[str], AgentLink | None]
AnomalySink = Callable[[str, AnomalyReport], None]
RecordSink = Callable[[ChannelRecord], None]


@dataclass
class _Ticket:
    """An admitted message's reservation of its receiver's backlog."""

    group: _Group
    receiver: str
    grant: ChannelGrant
    size: int
    phase: int


@dataclass
class _Delivery:
    did: str
    sender_zone: str
    sender_name: str
    message_id: str
    data: bytes
    digest: str | None
    ticket: _Ticket
    #: the sender was told already (it was held)
    told: bool = False
    #: written to the receiver's link (waiting for the workload to take it)
    written: bool = False
    #: ended() took it over (and audited it): its outlet task must not
    dropped: bool = False


@dataclass
class _Group:
    name: str
    #: None: any name may join (a group the manager opened for a lone zone)
    members: frozenset[str] | None
    grants: list[ChannelGrant]
    #: the group id audited (None for a lone zone launched without a group)
    label: str | None
    closed: bool = False
    live: dict[str, _Member] = field(default_factory=dict)
    ended: set[str] = field(default_factory=set)
    held: dict[str, collections.deque[_Delivery]] = field(default_factory=dict)
    #: receiver name -> [messages, bytes] reserved, held or in flight
    load: dict[str, list[int]] = field(default_factory=dict)

    def release(self, name: str, size: int) -> None:
        load = self.load.get(name)
        if load is not None:
            load[0] -= 1
            load[1] -= size
            if load[0] <= 0:
                del self.load[name]


class _Outlet:
    """One zone's writer thread: tasks run in order; a failing task is logged."""

    def __init__(self, zone_id: str) -> None:
        self._tasks: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"channel-{zone_id}",
                                        daemon=True)
        self._thread.start()

    def put(self, task: Callable[[], None]) -> None:
        self._tasks.put(task)

    def close(self, wait: float = 0.0) -> None:
        self._tasks.put(None)
        if wait and threading.current_thread() is not self._thread:
            self._thread.join(wait)

    def idle(self) -> bool:
        return self._tasks.unfinished_tasks == 0

    def _run(self) -> None:
        while (task := self._tasks.get()) is not None:
            try:
                task()
            except Exception:
                log.exception("channel task failed")
            finally:
                self._tasks.task_done()
        self._tasks.task_done()


@dataclass
class _Member:
    zone_id: str
    name: str
    group: _Group
    phase: int
    outlet: _Outlet
    reassembler: Reassembler = field(default_factory=Reassembler)
    buckets: dict[str, TokenBucket] = field(default_factory=dict)
    inflight: dict[str, _Delivery] = field(default_factory=dict)
    started: bool = False
    ended: bool = False


class Broker:
    def __init__(self, store: Store, *, link_of: LinkOf, anomaly: AnomalySink,
                 recorded: RecordSink | None = None) -> None:
        """`recorded` hears of each message or refusal once its row is written (the
        lifecycle announces it)."""
        self.store = store
        self._link_of = link_of
        self._anomaly = anomaly
        self._recorded = recorded
        self._lock = threading.RLock()
        self._groups: dict[str, _Group] = {}
        self._members: dict[str, _Member] = {}
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._janitor = threading.Thread(target=self._janitor_loop, name="channel-janitor",
                                         daemon=True)
        self._janitor.start()

    # -- groups (the pipeline's API) ------------------------------------------------------

    def open_group(self, group: str, members: Sequence[str],
                   grants: Sequence[ChannelGrant]) -> None:
        """Zones named `members` will be launched into `group`; `grants` say who may send
        to whom. ZoneError if the group is open already (unless the manager opened it for
        zones that are all among `members`: then it takes these members and grants)."""
        names = frozenset(members)
        if not names:
            raise ZoneError(f"channel group {group} needs at least one member")
        with self._lock:
            existing = self._groups.get(group)
            if existing is not None:
                if existing.members is not None or existing.closed \
                        or not set(existing.live) | existing.ended <= names:
                    raise ZoneError(f"channel group {group} is open already",
                                    hint="close it first, or pick another group name")
                existing.members = names
                existing.grants = list(grants)
                return
            self._groups[group] = _Group(group, names, list(grants), group)

    def close_group(self, group: str) -> None:
        """No more messages within `group`: what is held is dropped (audited as refused);
        members still running can send no more."""
        with self._lock:
            found = self._groups.get(group)
            if found is None:
                return
            found.closed = True
            dropped = self._drop_held(found, None, "the group was closed")
            if not found.live:
                del self._groups[group]
        self._record(dropped, strict=False)

    def group_members(self, group: str) -> dict[str, str]:
        """name -> zone id of the group's running members."""
        with self._lock:
            found = self._groups.get(group)
            return {} if found is None else {n: m.zone_id for n, m in found.live.items()}

    # -- zones (the manager's hooks) -------------------------------------------------------

    def register(self, zone_id: str, *, name: str, group: str | None,
                 grants: Sequence[ChannelGrant], phase: int) -> None:
        """A zone named `name` is about to be made in `group`; ZoneError if it may not be
        (not a member, a live zone of that name already, a closed group)."""
        key = group if group is not None else f"~{zone_id}"
        with self._lock:
            found = self._groups.get(key)
            if found is None:
                found = self._groups[key] = _Group(key, None, list(grants), group)
            elif found.closed:
                raise ZoneError(f"channel group {group} is closed", zone_id=zone_id)
            elif found.members is not None and name not in found.members:
                raise ZoneError(f"{name} is not a member of channel group {group} "
                                f"(members: {', '.join(sorted(found.members))})",
                                zone_id=zone_id, hint="launch it under a member's name")
            elif name in found.live:
                raise ZoneError(f"a zone named {name} already runs in channel group {group} "
                                f"({found.live[name].zone_id})", zone_id=zone_id)
            elif found.members is None:
                known = {(g.source, g.target, g.both) for g in found.grants}
                found.grants += [g for g in grants if (g.source, g.target, g.both) not in known]
            member = _Member(zone_id, name, found, phase, _Outlet(zone_id))
            found.live[name] = member
            found.ended.discard(name)
            self._members[zone_id] = member

    def started(self, zone_id: str) -> None:
        """The zone's workload runs: what was held for it is delivered now."""
        with self._lock:
            member = self._members.get(zone_id)
            if member is None or member.ended:
                return
            member.started = True
            held = member.group.held.pop(member.name, collections.deque())
            for delivery in held:
                self._dispatch(member, delivery)

    def phase(self, zone_id: str, index: int) -> None:
        """The zone's phase in force is now `index` (grants' `phases` are the sender's)."""
        with self._lock:
            member = self._members.get(zone_id)
            if member is not None:
                member.phase = index

    def ended(self, zone_id: str) -> None:
        """The zone ended (or never started): what waits for it is dropped and audited,
        messages to its name are refused from now on."""
        with self._lock:
            member = self._members.pop(zone_id, None)
            if member is None or member.ended:
                return
            member.ended = True
            group = member.group
            if group.live.get(member.name) is member:
                del group.live[member.name]
                group.ended.add(member.name)
            records = self._drop_held(group, member.name, "receiver ended")
            for delivery in member.inflight.values():
                group.release(member.name, len(delivery.data))
                delivery.dropped = True
                if delivery.written:
                    records.append(self._row(delivery, member, "dropped",
                                             "receiver ended before its workload took it"))
                    continue
                record = self._row(delivery, member, "refused", "receiver ended")
                sender = self._members.get(delivery.sender_zone)
                if delivery.told or sender is None:
                    records.append(record)
                else:  # it waits for its verdict: no anomaly, the receiver's end is no fault
                    self._tell(sender, record, anomaly=False)
            member.inflight.clear()
            for fin in member.reassembler.drop_all("sender ended"):
                self._release(fin)
                records.append(self._fin_row(member, fin))
            if not group.live and (group.members is None or group.closed):
                self._groups.pop(group.name, None)
            # under the lock: a task put after this would never run (see _tell)
            member.outlet.close()
        self._record(records, strict=False)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            members = list(self._members.values())
        for member in members:
            member.outlet.close(wait=2.0)

    def settle(self, timeout: float = 5.0) -> bool:
        """Wait until every zone's outlet is idle (tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                busy = [m for m in self._members.values() if not m.outlet.idle()]
            if not busy:
                return True
            time.sleep(0.01)
        return False

    # -- from the agent links (reader threads) ---------------------------------------------

    def on_message(self, zone_id: str, msg: Message) -> None:
        """A ``channel_send`` piece or a ``channel_ack`` from the zone's agent. Raises
        ChannelFault for what cannot be used (the link counts it as malformed)."""
        now = time.monotonic()
        faults: list[str] = []
        with self._lock:
            member = self._members.get(zone_id)
            if member is None:
                raise ChannelFault(f"a {msg['type']} from zone {zone_id}, which has no channel")
            if msg["type"] == "channel_ack":
                # (it may come before the outlet that wrote it has audited it: that is fine,
                # the outlet goes on unless ended() took the delivery over)
                delivery = member.inflight.pop(msg["id"], None)
                if delivery is None:
                    raise ChannelFault(f"an acknowledgement of delivery {msg['id'][:40]}, "
                                       "which is not waiting")
                member.group.release(member.name, len(delivery.data))
                return
            finished = member.reassembler.piece(
                msg, lambda to, size: self._admit(member, to, size, now), now)
            for fin in finished:
                if fin.fault:
                    faults.append(fin.fault)
                self._finish(member, fin)
        if faults:
            raise ChannelFault("; ".join(faults))

    # -- judging and routing (under the lock) ----------------------------------------------

    def _admit(self, sender: _Member, to: str, size: int,
               now: float) -> tuple[_Ticket | None, str | None]:
        group = sender.group
        if sender.ended:
            return None, "sender ended"
        if group.closed:
            return None, f"channel group {group.label or group.name} is closed"
        if group.members is not None and to not in group.members:
            return None, f"no zone named {to} in channel group {group.label or group.name}"
        decision = decide(group.grants, sender=sender.name, receiver=to, phase=sender.phase,
                          size=size)
        if decision.refusal is not None or decision.grant is None:
            return None, decision.refusal or "no grant"
        if to in group.ended and to not in group.live:
            return None, "receiver ended"
        load = group.load.setdefault(to, [0, 0])
        if load[0] + 1 > HELD_MESSAGES or load[1] + size > HELD_BYTES:
            if not load[0]:
                del group.load[to]
            return None, (f"receiver backlog full ({load[0]} messages, {load[1]} bytes "
                          f"waiting for {to}; at most {HELD_MESSAGES} / {HELD_BYTES})")
        bucket = sender.buckets.get(to)
        if bucket is None:
            bucket = sender.buckets[to] = TokenBucket(decision.grant.max_rate, now)
        if not bucket.take(now):
            if not load[0]:
                del group.load[to]
            return None, (f"rate limit of {decision.grant.max_rate:g} messages/s from "
                          f"{sender.name} to {to} exceeded")
        load[0] += 1
        load[1] += size
        return _Ticket(group, to, decision.grant, size, sender.phase), None

    def _release(self, fin: Finished) -> None:
        ticket = fin.ticket
        if isinstance(ticket, _Ticket):
            ticket.group.release(ticket.receiver, ticket.size)

    def _finish(self, sender: _Member, fin: Finished) -> None:
        """A message that gets no more pieces: refuse it, deliver it or hold it."""
        if fin.refusal is not None or fin.data is None or not isinstance(fin.ticket, _Ticket):
            self._release(fin)
            record = self._fin_row(sender, fin)
            # a fault is an anomaly through the link already (malformed-message)
            self._tell(sender, record, anomaly=fin.fault is None)
            return
        ticket = fin.ticket
        group = ticket.group
        receiver = group.live.get(fin.to)
        delivery = _Delivery(f"d{next(self._ids)}", sender.zone_id, sender.name, fin.msg_id,
                             fin.data, fin.digest, ticket)
        if receiver is None and fin.to in group.ended:
            group.release(fin.to, fin.size)
            self._tell(sender, self._row(delivery, None, "refused", "receiver ended"),
                       anomaly=True)
        elif receiver is not None and receiver.started:
            self._dispatch(receiver, delivery)
        else:
            group.held.setdefault(fin.to, collections.deque()).append(delivery)
            delivery.told = True
            self._tell(sender, self._row(delivery, receiver, "held",
                                         f"{fin.to} has not started: delivered when it does"),
                       anomaly=False, verdict="delivered")

    def _dispatch(self, receiver: _Member, delivery: _Delivery) -> None:
        receiver.inflight[delivery.did] = delivery
        receiver.outlet.put(lambda: self._deliver(receiver, delivery))

    def _drop_held(self, group: _Group, name: str | None, reason: str) -> list[ChannelRecord]:
        """Held messages for `name` (None: for anyone) refused for `reason`; their rows."""
        records = []
        for to in [name] if name is not None else list(group.held):
            for delivery in group.held.pop(to, collections.deque()):
                group.release(to, len(delivery.data))
                records.append(self._row(delivery, None, "refused", reason))
        return records

    # -- outlets ---------------------------------------------------------------------------

    def _deliver(self, receiver: _Member, delivery: _Delivery) -> None:
        """On the receiver's outlet: write the message, audit it (once the receiver's agent
        has it, before the sender hears), tell the sender."""
        with self._lock:
            if delivery.dropped:
                return  # ended() audited it
        link = self._link_of(receiver.zone_id)
        problem = None
        try:
            if link is None:
                raise ZoneError("no agent link", zone_id=receiver.zone_id)
            link.channel_deliver(delivery.did, delivery.sender_name, delivery.data,
                                 timeout=DELIVER_TIMEOUT)
        except HvtsmError as exc:
            problem = f"could not be written to {receiver.name}'s agent: {exc}"
        with self._lock:
            if delivery.dropped:
                return  # the receiver ended meanwhile: ended() audited it
            if problem is None:
                delivery.written = True
            elif receiver.inflight.pop(delivery.did, None) is not None:
                delivery.ticket.group.release(receiver.name, len(delivery.data))
            sender = self._members.get(delivery.sender_zone)
        verdict = "delivered" if problem is None else "refused"
        record = self._row(delivery, receiver, verdict, problem or "")
        if delivery.told or sender is None:
            self._record([record])
            return
        self._tell(sender, record, anomaly=False)

    def _tell(self, sender: _Member, record: ChannelRecord, *, anomaly: bool,
              verdict: str | None = None) -> None:
        """Audit `record`, then give the sender its verdict (and raise the anomaly of a
        refusal), in order on the sender's outlet."""
        def task() -> None:
            self._record([record])
            said = verdict or ("delivered" if record.verdict == "delivered" else "refused")
            link = self._link_of(sender.zone_id)
            if link is not None and not sender.ended:
                try:
                    link.channel_verdict(record.message_id, said, record.reason or said)
                except HvtsmError as exc:
                    log.info("zone %s: verdict not sent: %s", sender.zone_id, exc)
            if anomaly and record.verdict == "refused":
                self._anomaly(sender.zone_id, AnomalyReport(
                    REFUSED, f"message to {record.receiver_name} refused: {record.reason}",
                    "broker", {"to": record.receiver_name, "size": record.size,
                               "digest": record.digest, "message_id": record.message_id,
                               "reason": record.reason, "phase": record.sender_phase}))
        with self._lock:  # ended() closes the outlet under the lock: nothing comes after
            if sender.ended:
                self._record([record], strict=False)
                return
            sender.outlet.put(task)

    def _row(self, delivery: _Delivery, receiver: _Member | None, verdict: str,
             reason: str) -> ChannelRecord:
        ticket = delivery.ticket
        keep = ticket.grant.audit_content and verdict in ("delivered", "held", "dropped")
        return ChannelRecord(
            ts=time.time(), group_id=ticket.group.label, message_id=delivery.message_id,
            sender_zone=delivery.sender_zone, sender_name=delivery.sender_name,
            receiver_zone=receiver.zone_id if receiver is not None else self._zone_named(
                ticket.group, ticket.receiver),
            receiver_name=ticket.receiver, size=len(delivery.data), digest=delivery.digest,
            verdict=verdict, reason=reason, sender_phase=ticket.phase,
            content=delivery.data if keep else None)

    def _fin_row(self, sender: _Member, fin: Finished) -> ChannelRecord:
        group = sender.group
        return ChannelRecord(
            ts=time.time(), group_id=group.label, message_id=fin.msg_id,
            sender_zone=sender.zone_id, sender_name=sender.name,
            receiver_zone=self._zone_named(group, fin.to), receiver_name=fin.to,
            size=fin.size, digest=fin.digest, verdict="refused",
            reason=fin.refusal or "refused", sender_phase=sender.phase)

    @staticmethod
    def _zone_named(group: _Group, name: str) -> str | None:
        member = group.live.get(name)
        return member.zone_id if member is not None else None

    def _record(self, records: list[ChannelRecord], *, strict: bool = True) -> None:
        """Write the rows. `strict`: a failure propagates (an outlet task then stops before
        it announces anything: nothing unaudited is said)."""
        if not records:
            return
        try:
            with self.store.session() as session:
                for record in records:
                    record_channel_message(session, record)
        except Exception:
            log.exception("could not audit %d channel message(s)", len(records))
            if strict:
                raise
            return
        recorded = self._recorded
        if recorded is None:
            return
        for record in records:
            try:
                recorded(record)
            except Exception:
                log.exception("announcing a channel message failed")

    # -- the janitor -----------------------------------------------------------------------

    def _janitor_loop(self) -> None:
        """Gives up messages whose pieces stopped coming (each a fault of its sender)."""
        while not self._stop.wait(1.0):
            now = time.monotonic()
            faults: list[tuple[str, str]] = []
            with self._lock:
                for member in list(self._members.values()):
                    for fin in member.reassembler.expire(now):
                        faults.append((member.zone_id, fin.fault or "never finished"))
                        self._finish(member, fin)
            for zone_id, fault in faults:
                link = self._link_of(zone_id)
                if link is not None:
                    link.report_bad(f"channel: {fault}")


__all__ = ["HELD_BYTES", "HELD_MESSAGES", "REFUSED", "Broker"]
