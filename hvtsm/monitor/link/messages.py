"""What each message from the agent means to the host: one handler per type, run on the
reader thread.

Every message is numbered (`seq`): gaps, regressions and a restarted agent are problems.
Answers go to the request waiting for their id, workload messages to their workload,
events (within their budget) to `on_event`, channel lines to `on_channel`. Nothing here
trusts a value the agent chose before `checks` says it can be true.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

from guest_agent.protocol import OVERSIZED, Item, Message, ProtocolError, SeqTracker
from hvtsm.errors import ZoneError
from hvtsm.monitor.link.checks import clip, epoch_ok, pid_ok, seq_ok, short, status_ok
from hvtsm.monitor.link.flood import FloodControl
from hvtsm.monitor.link.handlers import ChannelFault, Handlers
from hvtsm.monitor.link.hello import Hello, doubts
from hvtsm.monitor.link.limits import MAX_STATUS
from hvtsm.monitor.link.pending import PendingTable
from hvtsm.monitor.link.problems import FailureLog, ProblemLog
from hvtsm.monitor.link.registry import Workloads
from hvtsm.monitor.link.state import LinkState
from hvtsm.monitor.link.watchdog import Watchdog

log = logging.getLogger(__name__)

#: (message, when it was handled, when its bytes were read: the flood window it is in)
_Handler = Callable[[Message, float, float], None]
#: writes one message to the agent, within a timeout (the transport's `send`)
Send = Callable[[Message, float], None]


class Dispatcher:
    """See the module docstring. The reader thread's alone, but for `bad`."""

    def __init__(self, *, state: LinkState, watchdog: Watchdog, pending: PendingTable,
                 workloads: Workloads, flood: FloodControl, problems: ProblemLog,
                 failures: FailureLog, handlers: Handlers, send: Send) -> None:
        self._state = state
        self._watchdog = watchdog
        self._pending = pending
        self._workloads = workloads
        self._flood = flood
        self._problems = problems
        self._failures = failures
        self._handlers = handlers
        self._send = send
        self._seqs = SeqTracker()
        #: the ping asking a hello of an agent that greeted an earlier connection
        self._hello_asked: str | None = None
        #: the ping whose hello tells which workloads ended while their exit was discarded
        self._state_asked: str | None = None
        self._on: dict[str, _Handler] = {
            "hello": self._on_hello, "heartbeat": self._on_heartbeat,
            "started": self._on_started, "standby_ready": self._on_standby_ready,
            "output": self._on_output, "exit": self._on_exit,
            "probe_result": self._on_probe_result, "admin_result": self._on_probe_result,
            "error": self._on_error,
            "event": self._on_event, "channel_send": self._on_channel,
            "channel_ack": self._on_channel}

    @property
    def dropped(self) -> int:
        """Messages the agent numbered that never arrived."""
        return self._seqs.missing

    def handle_safely(self, item: Item, read_at: float) -> None:
        try:
            self._handle(item, read_at)
        except Exception:  # one bad message must not stop the rest
            self._failures.failed("handling a message from the guest agent")

    def bad(self, detail: str) -> None:
        """A valid message whose content cannot be true: counted, reported as malformed."""
        self._state.count_implausible(detail)
        self._problems.problem("malformed", detail)

    def ask_state(self) -> None:
        """After discarding: ask for a hello, whose list of running workloads tells whose
        exit was among the discarded lines (`_settle`)."""
        self._state_asked = self._state.new_id("s")
        self._ask_hello(self._state_asked)

    # -- every message ---------------------------------------------------------------------

    def _handle(self, item: Item, read_at: float) -> None:
        if isinstance(item, ProtocolError):
            self._state.count_bad(f"a bad line ({item.describe()})")
            self._problems.problem("oversized" if item.kind == OVERSIZED else "malformed",
                                   item.describe())
            return
        mtype: str = item["type"]
        seq: int = item["seq"]
        if not seq_ok(seq):
            self.bad(f"a {mtype} with seq {short(seq)}, which no counter reaches: discarded")
            return
        now = time.monotonic()
        self._state.count_message(mtype, seq)
        if self._watchdog.heard(now):
            log.info("zone %s: the guest agent speaks again", self._state.zone_id)
        restart = False
        if mtype == "hello" and self._state.hello is not None and item.get("id") is None \
                and self._seqs.last is not None and seq <= self._seqs.last:
            restart = True
            self._problems.problem(
                "agent_restart", f"the guest agent said hello again with seq {seq} "
                                 f"(pid {short(item.get('pid'))}): it restarted")
        gap = self._seqs.observe(seq, restart=restart)
        if gap > 0:
            self._problems.problem("seq_gap", f"{gap} message(s) from the guest agent never "
                                              f"arrived (before seq {seq}, a {mtype})")
        elif gap < 0:
            self._problems.problem("seq_regress", f"seq went back to {seq} ({mtype})")
        if mtype != "hello" and self._state.hello is None and self._hello_asked is None:
            # the agent greeted an earlier connection: ask it for a hello
            self._hello_asked = self._state.new_id("h")
            self._ask_hello(self._hello_asked)
        self._on[mtype](item, now, read_at)

    def _ask_hello(self, mid: str) -> None:
        """Send a ping asking for a hello, from a thread: the reader never blocks on a write."""
        if self._state.closed:
            return

        def ask() -> None:
            with contextlib.suppress(ZoneError):
                self._send({"type": "ping", "id": mid, "hello": True}, 5.0)

        threading.Thread(target=ask, name="agent-link-ask-hello", daemon=True).start()

    def _answer(self, mid: str, msg: Message, error: str | None = None) -> bool:
        """Answer the request `mid`, if one waits for it: True if one did."""
        pending = self._pending.waiting(mid)
        if pending is None:
            return False
        mtype = msg["type"]
        wrong = pending.mismatch(mtype)
        if wrong is not None:
            self.bad(f"a {mtype} answered request {short(mid)}, which waits for a "
                     f"{pending.expect}")
            pending.answer(error=wrong)
            return True
        pending.answer(msg, error)
        return True

    # -- by type ---------------------------------------------------------------------------

    def _on_hello(self, msg: Message, now: float, read_at: float) -> None:
        for doubt in doubts(msg):
            self.bad(doubt)
        hello = Hello.from_message(msg, now)
        first = self._state.set_hello(hello)
        if self._state_asked is not None and msg.get("id") == self._state_asked:
            self._state_asked = None
            self._settle(hello)
        if first:
            log.info("zone %s: guest agent %s (protocol %s, python %s, kernel %s) after %s ms "
                     "of guest uptime", self._state.zone_id, short(hello.agent_version),
                     short(hello.protocol), short(hello.python), short(hello.kernel),
                     short(hello.boot_ms))

    def _settle(self, hello: Hello) -> None:
        """The agent lists a workload until its exit is written, and this hello came after
        every line written before it: a confirmed workload not listed and not finished
        here ended, and its exit was discarded."""
        works = self._workloads.running_unlisted({wid for wid, _ in hello.workloads})
        if not works:
            return
        # reported before any waiter wakes: whoever sees the exit can already see why
        self._problems.problem(
            "flood", "the exit of {} was discarded in a flood: status unknown ({} recorded)"
            .format(short(", ".join(w.id for w in works), 200), MAX_STATUS))
        for work in works:
            work.exit_discarded(MAX_STATUS)

    def _on_heartbeat(self, msg: Message, now: float, read_at: float) -> None:
        mid = msg.get("id")
        if mid is not None:
            self._answer(mid, msg)

    def _on_started(self, msg: Message, now: float, read_at: float) -> None:
        mid, pid = msg["id"], msg["pid"]
        if not pid_ok(pid):
            self.bad(f"started {short(mid)} with pid {short(pid)}, which no guest process "
                     "has (pid 0 recorded)")
            pid = 0
        work = self._workloads.get(mid)
        if work is not None:
            if work.started_at is not None:  # the first pid stands: a second may be a lie
                self.bad(f"a second started for workload {short(mid)}: ignored")
                return
            note = msg.get("standby")
            work.started(pid, None if note is None else {
                k: note.get(k) for k in ("used", "id", "pid", "prepared", "mode", "reason")},
                now)
        self._answer(mid, msg)

    def _on_standby_ready(self, msg: Message, now: float, read_at: float) -> None:
        if not pid_ok(msg["pid"]):
            self.bad(f"standby {short(msg['id'])} ready with pid {short(msg['pid'])}, "
                     "which no guest process has")
        if not self._answer(msg["id"], msg):
            log.info("zone %s: standby %s ready, which nobody waits for",
                     self._state.zone_id, short(msg["id"]))

    def _on_output(self, msg: Message, now: float, read_at: float) -> None:
        work = self._workloads.get(msg["id"])
        if work is not None:
            work.output(msg["stream"], msg["data"])

    def _on_exit(self, msg: Message, now: float, read_at: float) -> None:
        mid, status = msg["id"], msg["status"]
        if not status_ok(status):
            self.bad(f"exit of {short(mid)} with status {short(status)}, which no process "
                     f"has ({MAX_STATUS} recorded)")
            status = MAX_STATUS
        work = self._workloads.exit_of(mid, status)
        if work is None:
            return
        if work.poll() is not None:  # the first status stands: a repeat may not rewrite it
            log.debug("zone %s: repeated exit of %s", self._state.zone_id, mid)
            return
        work.exited(status)

    def _on_probe_result(self, msg: Message, now: float, read_at: float) -> None:
        """A probe's or an admin request's answer: ok, or the agent's error text."""
        error = None if msg["ok"] else clip(str(msg.get("error") or "failed"))
        if not self._answer(msg["id"], msg, error):
            log.debug("late %s %s", msg["type"], short(msg["id"]))

    def _on_error(self, msg: Message, now: float, read_at: float) -> None:
        mid = msg.get("id")
        text = clip(msg["message"])
        if mid is not None and self._answer(mid, msg, text):
            return
        work = self._workloads.get(mid) if mid is not None else None
        if work is not None:
            work.agent_error(text)
        self._problems.problem("agent_error", text if mid is None else f"{mid}: {text}")

    def _on_channel(self, msg: Message, now: float, read_at: float) -> None:
        handler = self._handlers.on_channel
        if handler is None:
            self.bad(f"a {msg['type']} from an agent whose zone has no channel: discarded")
            return
        try:
            handler(msg)
        except ChannelFault as e:
            self.bad(f"channel: {e}")
        except Exception:
            self._failures.failed("the on_channel handler")

    def _on_event(self, msg: Message, now: float, read_at: float) -> None:
        verdict = self._flood.admit_event(read_at)
        if not verdict.passed:
            if verdict.report is not None:
                self._problems.problem("events_dropped", verdict.report)
            return
        # the handler gets the shape it was promised, whatever the agent put there
        if msg.get("data") is None:
            msg["data"] = {}
        when = msg.get("time")
        if when is None:
            msg.pop("time", None)
        elif not epoch_ok(when):
            self.bad(f"event {short(msg['kind'])} with time {short(when)}, which is no "
                     "time: removed")
            del msg["time"]
        handler = self._handlers.on_event
        if handler is not None:
            try:
                handler(msg)
            except Exception:
                self._failures.failed("the on_event handler")
