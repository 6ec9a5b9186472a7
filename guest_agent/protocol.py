"""The wire protocol between the guest agent and the host: the one definition.

The agent (python >= 3.9, stdlib only) and the host controller (``hvtsm``) both import this
module, so it uses nothing newer than Python 3.9 at run time.

Framing: JSON lines. Each message is one JSON object encoded as UTF-8 and ended by a single
``\\n``; blank lines are ignored (the agent writes one before each ``hello`` so a line torn
by a reconnect is cut off and reported as malformed instead of corrupting the next one).
An encoded line, newline included, is at most ``MAX_MESSAGE_BYTES`` bytes: ``encode`` refuses
longer messages, and ``Decoder`` discards a longer line up to its newline (reported once, as
an ``oversized`` ProtocolError) without ever buffering more than ``MAX_MESSAGE_BYTES``.

Every message has ``type``. Every message from the agent has ``seq``: 0, 1, 2, ... for the
life of the agent process (it goes on across host reconnects, and a message the agent had to
discard still uses up its number), so a gap tells the host how many messages it lost.
Unknown fields are ignored (room to grow); unknown types are errors.

agent -> host
    hello         protocol, agent_version, capabilities[str], pid, kernel, python, boot_ms;
                  optional heartbeat (period, s), hostname, port, workloads[{id, pid}] (those
                  whose exit is not sent yet), dropped (as in heartbeat), id (when it
                  answers a ``ping`` with ``hello: true``), deputy{} (DEPUTY_REPORT: what
                  the zone's deputy applied that no host acknowledged yet, and since when
                  no host was connected)
    heartbeat     uptime (s since boot); optional id (answer to a ``ping``), dropped (messages
                  the agent discarded so far), queued (bytes waiting to be sent)
    started       id, pid                  the workload ``id`` exec'd (pid in the guest);
                  optional standby{} when the start named one: {used (bool), id, pid,
                  prepared (epoch s), mode; reason (text) when not used}
    output        id, stream (stdout|stderr), data (text; bytes decoded as UTF-8 with
                  replacement, cut into messages that fit MAX_MESSAGE_BYTES)
    exit          id, status               status < 0: killed by signal -status
    probe_result  id, ok; result{} when ok, error (text) when not
    error         message; optional id (the request it answers), kind (a ProtocolError kind
                  when the agent rejects a host message)
    event         kind; optional id (workload), time (epoch s), data{}: what the monitor
                  saw. An agent announces ``events:<kind>`` in its capabilities first.
                  kind ``anomaly``: data = ANOMALY fields below;
                  kind ``monitor``: data = {mechanisms[str], warnings[str]} when a
                  workload's monitoring began; kind ``stats``: data = {notifications,
                  file_events, lost, dropped} counters, periodic.
                  kind ``code-path``: data = CODE_PATH_FIELDS: a process started a code
                  path the profile's ``transient`` did not foresee; its call is held until
                  a ``transient`` message (op split or deny) answers ``hold``, or until
                  ``transient.hold_timeout`` passes (then it fails with EPERM and a
                  ``transient-timeout`` anomaly follows: fail closed);
                  kind ``transient``: data = {op, ok, zone, hold, pid, error, held_ms,
                  procs, memory}: the agent's answer to a ``transient`` message, or op
                  ``ended`` when a transient zone's cgroup it manages became empty;
                  kind ``deputy``: data = DEPUTY_RECORD fields: a phase the deputy applied
                  (sent at once while a host is connected; also listed in each hello
                  until acknowledged).
    channel_send  id (the sender's message id, unique per agent), to (the receiving zone's
                  name), size (bytes of the whole message), offset (of this piece's first
                  byte), data (base64 of at most CHANNEL_PIECE_BYTES bytes); optional cancel
                  (true: the sender gave up, no more pieces come). A message goes as pieces
                  of rising offset, in order, each on its own line; the host reassembles
                  them with a bound (the grant's max_message) and answers ``channel_verdict``
    channel_ack   id (a delivery id): the workload took that delivered message
    standby_ready id (the standby's), pid, prepared (epoch s), mode: a ``standby`` is
                  started, watched, and waits for its request (a failure is an ``error``
                  with the standby's id)
    admin_result  id (the request's), op, ok; error (text) when not ok; the op's result
                  fields (ADMIN_RESULTS) when ok: the answer to an ``admin`` request

host -> agent
    start         id, argv[str]; optional env{str: str}, cwd, user (name or uid),
                  stdout (stream|discard), stderr (stream|discard|stdout: joined to stdout),
                  monitor{} (a monitoring profile, see guest_agent.profile.PROFILE_FIELDS:
                  the workload's whole process tree is watched from before its first
                  instruction), standby (the id of a prepared standby: it becomes the
                  workload when it fits the request -- same user and program, streamed
                  output, a filter that notifies all the profile needs -- else it is killed
                  and the workload starts normally; the ``started`` says which and why; a
                  standby serves one request only)
    standby       id (the standby's), mode (STANDBY_MODES), monitor{}; optional user,
                  python (the interpreter of the loader, default python3), program (exec
                  mode: what requests run, e.g. /bin/sh). The agent starts ``python -c
                  LOADER`` as a workload is started (the user, the filter of `monitor`
                  installed before its first instruction, fanotify marks), which waits for
                  one request; a newer standby replaces (kills) an older one. Answered by
                  ``standby_ready`` or an ``error``. guest_agent/standby.py says more.
    profile       id (workload), monitor{}   replaces the workload's profile (the host sends
                  one after each phase, so "connect outside the allow-list" follows it)
    signal        id (workload), signal (number)
    probe         id, kind; optional args{}
    ping          optional id, hello (true: answer with a hello instead of a heartbeat)
    transient     id (workload), op (TRANSIENT_OPS); optional hold (code-path event it
                  answers), zone (the transient zone), cgroup (a cgroup the agent makes and
                  manages under its transient root: in a guest), limits{} (TRANSIENT_LIMITS),
                  network (full|loopback|none: judged at connect for the zone's processes),
                  reason. split: the held process goes to `zone` (into `cgroup` first when
                  given, else the host placed it already) and its call proceeds; deny: the
                  held call fails (EPERM); update: new limits/network; kill, freeze, thaw,
                  stats: on the zone's cgroup. Answered by an event of kind ``transient``.
    channel_deliver id (a delivery id), from (the sending zone's name), size, offset, data
                  (base64): a message for the workload, in pieces as ``channel_send``; the
                  agent answers ``channel_ack`` once the workload took it
    channel_verdict id (the sender's message id), verdict (delivered|refused), reason (text)
    deputy        id (the zone), phases[{index, due (epoch s), steps[], terminate}];
                  optional in_force (the highest phase the host applied), grace (s, at
                  most 5), fail_closed[] (steps that end the zone when a step fails),
                  lock (a directory whose flock both sides hold while writing limits),
                  sent (the host's epoch s when it sent this: the agent's times follow the
                  host's clock).
                  The zone's schedule, replacing the one before (no phases: none left);
                  the deputy applies a phase `grace` s after its due time unless the host
                  said it is in force (guest_agent/deputy.py; steps:
                  guest_agent/deputy_steps.py)
    deputy_ack    id (the zone), seq; optional thaw: the host audited the deputy's records
                  up to `seq` and the time it was away (the agent forgets them); thaw: it
                  applied what the deputy's freezes stood in for (they end)
    admin         id, op (ADMIN_OPS) and the op's fields (ADMIN_FIELDS): guest
                  administration as a typed request, carried out off the agent's reader
                  thread, one at a time, and answered by ``admin_result``
                  (guest_agent/admin.py):
                  scrub {uid, gid, scratch, shared[], private[]}: kill every process of
                  real uid `uid` (rounds of SIGKILL until none is left); on the guest's
                  first scrub mount a private tmpfs on each `private` dir that is no mount
                  point yet and record the uid's entries of the `shared` dirs as known;
                  delete the uid's other top-level entries of the `shared` dirs; make
                  `scratch` fresh (0700, uid:gid). Result: killed, deleted, rounds, seconds.
                  link_down {iface} -> iface, was_up. remount_ro {path} -> path, was_ro,
                  how (superblock|bind). nproc {pid, limit}: RLIMIT_NPROC lowered, never
                  raised -> pid, limit, previous [soft, hard] (-1: unlimited).

A ``start`` with ``channel`` (the zone's name among its group) gives the workload the channel
endpoint: a unix stream socket at the abstract address CHANNEL_ADDRESS in the workload's
network namespace, named in its environment as ``HVTSM_CHANNEL=unix:@<address>``
(``guest_agent/channel.py`` is the client). The channel lines have their own accounting on
both ends (a lane of their own in the agent's outbox, a line budget of their own in the
host's reader), so channel traffic and monitoring events cannot starve each other.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator
from typing import Any, Callable, Optional, Union, cast

PROTOCOL_VERSION = 1
#: the longest encoded message, trailing newline included
MAX_MESSAGE_BYTES = 64 * 1024
#: the virtio-serial port name (libvirt channel target name) the agent looks for
PORT_NAME = "org.hvtsm.agent.0"
#: the longest id the host may give a request or workload
MAX_ID_CHARS = 128
#: bytes of workload output read at once by the agent: even at the worst JSON expansion
#: (a control byte becomes 6 characters) one read fits in one message
OUTPUT_CHUNK_BYTES = 8192

#: raw bytes of one channel piece: base64 makes 60 KiB of it, which leaves room in a line
#: for the other fields (ids and names are at most MAX_ID_CHARS)
CHANNEL_PIECE_BYTES = 45 * 1024
#: the largest channel message any grant may allow
CHANNEL_MAX_BYTES = 16 * 1024 * 1024
#: the abstract unix socket (per network namespace) the workload reaches its agent at
CHANNEL_ADDRESS = "hvtsm.channel"
#: environment variables a workload with a channel gets
CHANNEL_ENV = "HVTSM_CHANNEL"
CHANNEL_NAME_ENV = "HVTSM_CHANNEL_NAME"
CHANNEL_VERDICTS = ("delivered", "refused")
#: how every channel line begins (the agent puts ``type`` first): the host's reader counts
#: channel lines by it before parsing, against their own budget
CHANNEL_LINE_PREFIX = b'{"type":"channel_'

AGENT_TYPES = frozenset(
    ["hello", "heartbeat", "started", "output", "exit", "probe_result", "error", "event",
     "channel_send", "channel_ack", "standby_ready", "admin_result"]
)
HOST_TYPES = frozenset(["start", "signal", "probe", "ping", "profile", "transient",
                        "channel_deliver", "channel_verdict", "standby", "admin", "deputy",
                        "deputy_ack"])
#: ``standby.mode``: python (the loader runs the script itself) | exec (it execs the program)
STANDBY_MODES = ("python", "exec")
CHANNEL_TYPES = frozenset(["channel_send", "channel_ack", "channel_deliver", "channel_verdict"])

#: event kinds
EVENT_ANOMALY = "anomaly"
EVENT_MONITOR = "monitor"
EVENT_STATS = "stats"
EVENT_CODE_PATH = "code-path"
EVENT_TRANSIENT = "transient"
EVENT_DEPUTY = "deputy"

#: ``event`` kind ``deputy`` (and each of a hello's ``deputy.records``): a phase the zone's
#: deputy applied. started/finished: epoch s; ok false: a step failed (`error`) and the
#: deputy ended the zone (fail closed); terminate: the zone's processes are gone; froze:
#: part of it is a freeze until the host applies the real restriction; alone: no host was
#: connected; together: lower phases it brought in force; results: one text per step.
DEPUTY_RECORD = ("seq", "zone", "phase", "due", "started", "finished", "ok", "terminate",
                 "froze", "alone", "together", "results", "error")
#: a hello's ``deputy``: records (DEPUTY_RECORD objects), lost (records dropped for room),
#: alone_since (epoch s the host went away, or null), zones {zone: phase in force}
DEPUTY_REPORT = ("records", "lost", "alone_since", "zones")

#: ``event`` kind ``code-path``: data fields. trigger is "exec" (program, argv) or
#: "connect" (address, port, family); hold numbers the held call for the answer.
CODE_PATH_FIELDS = ("hold", "pid", "ppid", "trigger", "program", "argv", "family", "address",
                    "port")
CODE_PATH_TRIGGERS = ("exec", "connect")
TRANSIENT_OPS = ("split", "deny", "update", "kill", "freeze", "thaw", "stats")
#: ``transient.limits``: field -> meaning (None/absent: not limited by the transient zone)
TRANSIENT_LIMITS = {"memory": "bytes", "pids": "processes", "cpu_quota": "percent of a CPU",
                    "cpu_shares": "relative weight (1024 = default)"}

#: ``admin.op`` -> the fields that op requires (guest_agent/admin.py carries them out)
ADMIN_FIELDS = {
    "scrub": ("uid", "gid", "scratch", "shared", "private"),
    "link_down": ("iface",),
    "remount_ro": ("path",),
    "nproc": ("pid", "limit"),
}
ADMIN_OPS = tuple(ADMIN_FIELDS)
#: ``admin_result`` of an op that succeeded -> its result fields
ADMIN_RESULTS = {
    "scrub": ("killed", "deleted", "rounds", "seconds", "ipc_removed"),
    "link_down": ("iface", "was_up"),
    "remount_ro": ("path", "was_ro", "how"),
    "nproc": ("pid", "limit", "previous"),
}

#: a monitoring profile (``start.monitor``, ``profile.monitor``) is declared, field by field,
#: in guest_agent/profile.py (`Profile`; its meanings: `profile.PROFILE_FIELDS`), which also
#: validates it: unknown fields are refused there.

#: ``event`` kind ``anomaly``: data fields. category is one of ANOMALY_CATEGORIES. Optional
#: beyond these: zone (ANOMALY_ZONE), the transient zone the process is in.
ANOMALY_FIELDS = ("category", "detail", "pid", "program", "syscall", "args", "contained",
                  "act_time", "act_mono", "contained_mono")
ANOMALY_ZONE = "zone"
ANOMALY_CATEGORIES = (
    "denied-syscall", "sensitive-path", "unexpected-exec", "reverse-shell", "connect-out",
    "fork-rate", "syscall-rate", "new-file-rate", "memory-spike", "oom-kill",
    "events-dropped", "foreign-abi",
    # an open for writing of another process's /proc/PID/mem (code injection)
    "injection",
    # the zone's processes used more than max_cpu_share of its CPUs for cpu_window seconds
    "cpu-hog",
    # code of network origin exec'd, mapped executable, preloaded or interpreted
    # (provenance), and files removed faster than max_deletes_per_s
    "dropped-code", "deletion-rate",
    # transient zones: a held code path the host did not answer in time (the agent), one
    # split too many for the policy's max_zones (raised by the host itself)
    "transient-timeout", "transient-limit",
)
STREAMS = ("stdout", "stderr")

#: ProtocolError kinds
OVERSIZED = "oversized"
MALFORMED = "malformed"  # not UTF-8, not JSON, not an object, no usable type
UNKNOWN_TYPE = "unknown_type"
INVALID = "invalid"  # a field is missing or of the wrong type


class ProtocolError(ValueError):
    """A message that cannot be used. ``decode`` and ``Decoder`` return these (they do not
    raise them) so a reader can report and go on; ``encode`` raises them."""

    def __init__(self, kind: str, detail: str, *, msg_type: str | None = None,
                 msg_id: str | None = None, excerpt: str = "", size: int = 0) -> None:
        self.kind = kind
        self.detail = detail
        self.msg_type = msg_type
        self.msg_id = msg_id
        self.excerpt = excerpt
        self.size = size
        super().__init__(self.describe())

    def describe(self) -> str:
        text = f"{self.kind}: {self.detail}"
        if self.excerpt:
            text += f" (line starts {self.excerpt!r})"
        return text

    def __str__(self) -> str:
        return self.describe()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ProtocolError):
            return NotImplemented
        return (self.kind, self.detail, self.msg_type, self.msg_id) == (
            other.kind, other.detail, other.msg_type, other.msg_id)

    __hash__ = ValueError.__hash__


Message = dict[str, Any]
Item = Union[Message, ProtocolError]

# --- field checks: each returns an error text, or None when the value is fine ------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(v: Any) -> str | None:
    return None if _is_int(v) else "must be an integer"


def _seq(v: Any) -> str | None:
    return None if _is_int(v) and v >= 0 else "must be an integer >= 0"


def _num(v: Any) -> str | None:
    ok = (_is_int(v) or isinstance(v, float)) and v == v  # NaN never arrives (allow_nan=False)
    return None if ok else "must be a number"


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _str(v: Any) -> str | None:
    return None if isinstance(v, str) else "must be a string"


def _ident(v: Any) -> str | None:
    if not isinstance(v, str) or not v:
        return "must be a non-empty string"
    if len(v) > MAX_ID_CHARS:
        return f"must be at most {MAX_ID_CHARS} characters"
    return None


def _dict(v: Any) -> str | None:
    return None if isinstance(v, dict) else "must be an object"


def _list(v: Any) -> str | None:
    return None if isinstance(v, list) else "must be a list"


def _str_list(v: Any) -> str | None:
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return None
    return "must be a list of strings"


def _argv(v: Any) -> str | None:
    if _str_list(v) is None and v:
        return None
    return "must be a non-empty list of strings"


def _env(v: Any) -> str | None:
    if isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str)
                                   for k, x in v.items()):
        return None
    return "must be an object of string values"


def _user(v: Any) -> str | None:
    if (isinstance(v, str) and v) or (_is_int(v) and v >= 0):
        return None
    return "must be a user name or a uid"


def _stream(v: Any) -> str | None:
    return None if v in STREAMS else "must be one of {}".format(", ".join(STREAMS))


def _signal(v: Any) -> str | None:
    return None if _is_int(v) and 0 < v < 128 else "must be a signal number (1-127)"


def _choice(*allowed: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in allowed else "must be one of {}".format(", ".join(allowed))
    return check


def _size(v: Any) -> str | None:
    return None if _is_int(v) and 0 <= v < 2**53 else "must be an integer >= 0"


def _id_number(v: Any) -> str | None:
    return None if _is_int(v) and 0 <= v < 2**32 else "must be an integer 0-4294967295"


def _pid(v: Any) -> str | None:
    return None if _is_int(v) and 0 < v < 2**31 else "must be a process id (> 0)"


def _path(v: Any) -> str | None:
    if isinstance(v, str) and v.startswith("/") and "\0" not in v:
        return None
    return "must be an absolute path"


def _paths(v: Any) -> str | None:
    if isinstance(v, list) and all(_path(x) is None for x in v):
        return None
    return "must be a list of absolute paths"


def _int_list(v: Any) -> str | None:
    return None if isinstance(v, list) and all(_is_int(x) for x in v) else \
        "must be a list of integers"


def _workloads(v: Any) -> str | None:
    if isinstance(v, list) and all(
            isinstance(w, dict) and _ident(w.get("id")) is None and _is_int(w.get("pid"))
            for w in v):
        return None
    return "must be a list of {id, pid} objects"


Check = Callable[[Any], Optional[str]]
#: type -> (required fields, optional fields)
SCHEMAS: dict[str, tuple[dict[str, Check], dict[str, Check]]] = {
    # agent -> host
    "hello": ({"seq": _seq, "protocol": _int, "agent_version": _str,
               "capabilities": _str_list, "pid": _int, "kernel": _str, "python": _str,
               "boot_ms": _int},
              {"heartbeat": _num, "hostname": _str, "port": _str, "workloads": _workloads,
               "id": _ident, "dropped": _int, "deputy": _dict}),
    "heartbeat": ({"seq": _seq, "uptime": _num},
                  {"id": _ident, "dropped": _int, "queued": _int}),
    "started": ({"seq": _seq, "id": _ident, "pid": _int}, {"standby": _dict}),
    "output": ({"seq": _seq, "id": _ident, "stream": _stream, "data": _str}, {}),
    "exit": ({"seq": _seq, "id": _ident, "status": _int}, {}),
    "probe_result": ({"seq": _seq, "id": _ident, "ok": _bool},
                     {"result": _dict, "error": _str}),
    "error": ({"seq": _seq, "message": _str}, {"id": _ident, "kind": _str}),
    "event": ({"seq": _seq, "kind": _str}, {"id": _ident, "time": _num, "data": _dict}),
    "channel_send": ({"seq": _seq, "id": _ident, "to": _ident, "size": _size,
                      "offset": _size, "data": _str}, {"cancel": _bool}),
    "channel_ack": ({"seq": _seq, "id": _ident}, {}),
    "standby_ready": ({"seq": _seq, "id": _ident, "pid": _int, "prepared": _num},
                      {"mode": _choice(*STANDBY_MODES)}),
    "admin_result": ({"seq": _seq, "id": _ident, "op": _choice(*ADMIN_OPS), "ok": _bool},
                     {"error": _str, "killed": _size, "deleted": _size, "rounds": _size,
                      "ipc_removed": _size, "seconds": _num, "iface": _str, "was_up": _bool,
                      "path": _str,
                      "was_ro": _bool, "how": _choice("superblock", "bind"), "pid": _int,
                      "limit": _int, "previous": _int_list}),
    # host -> agent
    "start": ({"id": _ident, "argv": _argv},
              {"env": _env, "cwd": _str, "user": _user, "stdout": _choice("stream", "discard"),
               "stderr": _choice("stream", "discard", "stdout"), "monitor": _dict,
               "channel": _ident, "standby": _ident}),
    "standby": ({"id": _ident, "mode": _choice(*STANDBY_MODES), "monitor": _dict},
                {"user": _user, "python": _str, "program": _str}),
    "profile": ({"id": _ident, "monitor": _dict}, {}),
    "signal": ({"id": _ident, "signal": _signal}, {}),
    "probe": ({"id": _ident, "kind": _str}, {"args": _dict}),
    "ping": ({}, {"id": _ident, "hello": _bool}),
    "transient": ({"id": _ident, "op": _choice(*TRANSIENT_OPS)},
                  {"hold": _seq, "zone": _ident, "cgroup": _str, "limits": _dict,
                   "network": _choice("full", "loopback", "none"), "reason": _str}),
    "channel_deliver": ({"id": _ident, "from": _ident, "size": _size, "offset": _size,
                         "data": _str}, {}),
    "channel_verdict": ({"id": _ident, "verdict": _choice(*CHANNEL_VERDICTS),
                         "reason": _str}, {}),
    "admin": ({"id": _ident, "op": _choice(*ADMIN_OPS)},
              {"uid": _id_number, "gid": _id_number, "scratch": _path, "shared": _paths,
               "private": _paths, "iface": _ident, "path": _path, "pid": _pid,
               "limit": _size}),
    "deputy": ({"id": _ident, "phases": _list},
               {"in_force": _int, "grace": _num, "fail_closed": _list, "lock": _path,
                "sent": _num}),
    "deputy_ack": ({"id": _ident, "seq": _seq}, {"thaw": _bool}),
}


def validate(msg: Any, accept: Iterable[str] = AGENT_TYPES | HOST_TYPES) -> ProtocolError | None:
    """The first thing wrong with `msg` as a message of one of the `accept` types, or None."""
    if not isinstance(msg, dict):
        return ProtocolError(MALFORMED,
                             f"a message must be a JSON object, not {type(msg).__name__}")
    mtype = msg.get("type")
    mid = msg.get("id") if isinstance(msg.get("id"), str) else None
    if not isinstance(mtype, str):
        return ProtocolError(MALFORMED, "the message has no string 'type'", msg_id=mid)
    if mtype not in accept or mtype not in SCHEMAS:
        return ProtocolError(UNKNOWN_TYPE, f"unknown message type {mtype[:40]!r}",
                             msg_type=mtype[:40], msg_id=mid)
    required, optional = SCHEMAS[mtype]
    for name, check in required.items():
        if name not in msg:
            return ProtocolError(INVALID, f"{mtype} message lacks field '{name}'",
                                 msg_type=mtype, msg_id=mid)
        problem = check(msg[name])
        if problem:
            return ProtocolError(INVALID, f"{mtype} field '{name}' {problem}",
                                 msg_type=mtype, msg_id=mid)
    for name, check in optional.items():
        if name in msg and msg[name] is not None:
            problem = check(msg[name])
            if problem:
                return ProtocolError(INVALID, f"{mtype} field '{name}' {problem}",
                                     msg_type=mtype, msg_id=mid)
    if mtype == "admin":
        for name in ADMIN_FIELDS[msg["op"]]:
            if msg.get(name) is None:
                return ProtocolError(INVALID, f"admin op {msg['op']} lacks field '{name}'",
                                     msg_type=mtype, msg_id=mid)
    if mtype == "admin_result" and not msg["ok"] and not isinstance(msg.get("error"), str):
        return ProtocolError(INVALID, "admin_result with ok=false lacks 'error'",
                             msg_type=mtype, msg_id=mid)
    if mtype == "probe_result":
        if msg["ok"] and not isinstance(msg.get("result"), dict):
            return ProtocolError(INVALID, "probe_result with ok=true lacks 'result'",
                                 msg_type=mtype, msg_id=mid)
        if not msg["ok"] and not isinstance(msg.get("error"), str):
            return ProtocolError(INVALID, "probe_result with ok=false lacks 'error'",
                                 msg_type=mtype, msg_id=mid)
    return None


def encode(msg: Message, *, check: bool = True) -> bytes:
    """One message as a line of bytes. Raises ProtocolError if it is invalid (`check`) or
    its line would be longer than MAX_MESSAGE_BYTES."""
    if check:
        problem = validate(msg)
        if problem is not None:
            raise problem
    try:
        line = (json.dumps(msg, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
                + "\n").encode("utf-8")
    except (TypeError, ValueError) as e:  # not JSON-serialisable, NaN, lone surrogate
        raise ProtocolError(MALFORMED, "cannot encode {} message: {}".format(
            msg.get("type"), e), msg_type=msg.get("type")) from None
    if len(line) > MAX_MESSAGE_BYTES:
        raise ProtocolError(OVERSIZED, "{} message is {} bytes encoded, the limit is {}".format(
            msg.get("type"), len(line), MAX_MESSAGE_BYTES), msg_type=msg.get("type"),
            size=len(line))
    return line


def _excerpt(raw: bytes) -> str:
    return raw[:60].decode("utf-8", errors="replace")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def decode(line: bytes, accept: Iterable[str] = AGENT_TYPES | HOST_TYPES) -> Item:
    """One line (without or with its newline) -> the message, or the ProtocolError."""
    if len(line) > MAX_MESSAGE_BYTES:
        return ProtocolError(OVERSIZED,
                             f"line of {len(line)} bytes, the limit is {MAX_MESSAGE_BYTES}",
                             excerpt=_excerpt(line), size=len(line))
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return ProtocolError(MALFORMED, f"not UTF-8: {e}", excerpt=_excerpt(line))
    try:
        msg = json.loads(text, parse_constant=_no_constant)
    except ValueError as e:  # json.JSONDecodeError, RecursionError is not a ValueError
        return ProtocolError(MALFORMED, f"not JSON: {e}", excerpt=_excerpt(line))
    except RecursionError:
        return ProtocolError(MALFORMED, "JSON nested too deeply", excerpt=_excerpt(line))
    problem = validate(msg, accept)
    if problem is not None:
        problem.excerpt = _excerpt(line)
        return problem
    return cast(Message, msg)  # validate made sure it is an object


class Decoder:
    """Splits a byte stream into messages. ``feed`` returns, in order, the messages and the
    ProtocolErrors for lines that could not be used; it never raises on bad input and
    never holds more than ``max_bytes`` of an unfinished line."""

    def __init__(self, accept: Iterable[str] = AGENT_TYPES | HOST_TYPES,
                 max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.accept = frozenset(accept)
        self.max_bytes = max_bytes
        self._buf = bytearray()
        #: bytes of an oversized line dropped so far (the line is being skipped)
        self._skipping: int | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Item]:
        out: list[Item] = []
        start = 0
        while start < len(data):
            nl = data.find(b"\n", start)
            end = len(data) if nl < 0 else nl
            piece = data[start:end]
            start = end + 1 if nl >= 0 else len(data)
            if self._skipping is not None:
                self._skipping += len(piece)
                if nl >= 0:
                    self._skipping = None
                continue
            if len(self._buf) + len(piece) + 1 > self.max_bytes:
                size = len(self._buf) + len(piece) + (1 if nl >= 0 else 0)
                what = f"line of {size} bytes" if nl >= 0 else \
                    f"unfinished line of more than {size} bytes"
                out.append(ProtocolError(
                    OVERSIZED, f"{what} discarded (the limit is {self.max_bytes})",
                    excerpt=_excerpt(bytes(self._buf[:60]) + piece[:60]), size=size))
                self._buf.clear()
                if nl < 0:
                    self._skipping = size
                continue
            if nl < 0:
                self._buf += piece
                continue
            if self._buf:
                self._buf += piece
                line = bytes(self._buf)
                self._buf.clear()
            else:
                line = piece
            if line.strip():
                out.append(decode(line, self.accept))
        return out

    def close(self) -> list[Item]:
        """At end of stream: an error for an unfinished line, if any."""
        left = bytes(self._buf)
        self._buf.clear()
        skipping, self._skipping = self._skipping, None
        if skipping is not None:
            return []  # already reported as oversized
        if left.strip():
            return [ProtocolError(MALFORMED, f"stream ended inside a line of {len(left)} bytes",
                                  excerpt=_excerpt(left))]
        return []


class SeqTracker:
    """Counts messages lost between the agent and the host from their ``seq`` numbers."""

    def __init__(self) -> None:
        self.last: int | None = None
        #: messages missing so far
        self.missing = 0
        #: messages whose seq was not above the one before (out of order, repeated)
        self.regressions = 0

    def observe(self, seq: int, *, restart: bool = False) -> int:
        """Record one message: returns how many went missing just before it (> 0), 0, or
        -1 if it went backwards. `restart` (a hello from a restarted agent) takes `seq` as
        the new base."""
        last, self.last = self.last, seq
        if restart or last is None:
            return 0
        if seq > last + 1:
            self.missing += seq - last - 1
            return seq - last - 1
        if seq <= last:
            self.regressions += 1
            self.last = last
            return -1
        return 0


def channel_pieces(mtype: str, msg_id: str, peer_field: str, peer: str,
                   data: bytes) -> Iterator[Message]:
    """``channel_send`` (peer_field "to") or ``channel_deliver`` (peer_field "from") messages,
    without ``seq``, carrying `data` in pieces of at most CHANNEL_PIECE_BYTES, made one at a
    time (a big message is never all encoded at once). An empty message is one empty piece.
    The type comes first (CHANNEL_LINE_PREFIX)."""
    offset = 0
    view = memoryview(data)
    while True:
        piece = view[offset:offset + CHANNEL_PIECE_BYTES]
        yield {"type": mtype, "id": msg_id, peer_field: peer, "size": len(data),
               "offset": offset, "data": base64.b64encode(piece).decode("ascii")}
        offset += len(piece)
        if offset >= len(data):
            return


def output_messages(workload_id: str, stream: str, text: str) -> list[Message]:
    """``output`` messages (without ``seq``) carrying `text`, each small enough to encode
    (a seq of up to 20 digits included)."""
    room = MAX_MESSAGE_BYTES - 120 - len(workload_id.encode("utf-8", "replace")) * 6

    def size(part: str) -> int:
        return len(json.dumps(part, ensure_ascii=False).encode("utf-8", "surrogatepass"))

    out: list[Message] = []
    pending = [text]
    while pending:
        part = pending.pop(0)
        if size(part) <= room or len(part) <= 1:
            out.append({"type": "output", "id": workload_id, "stream": stream, "data": part})
        else:
            half = len(part) // 2
            pending[:0] = [part[:half], part[half:]]
    return out
