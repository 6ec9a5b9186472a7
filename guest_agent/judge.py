"""Judging one notified call against a profile: pure functions returning a frozen Verdict,
with no seccomp, no /proc and no clock. What a verdict needs to know about the watch and
the caller beyond the call itself (its first exec done, the caller's transient zone, where
an exec's target resolves...) comes in `Facts`, gathered by the caller of `judge`
(notifications.py); every side effect (answering, containing, holding, reporting) happens
there too.

A verdict is one of three actions:

* ``anomaly``: the call breaks the profile; it is contained as ``profile.contain`` says
  and reported (protocol.ANOMALY_FIELDS);
* ``hold``: an unforeseen code path of a transient profile; the call waits for the host;
* ``fail``: the call cannot succeed (an exec whose target does not exist in the caller's
  view: a PATH search trying each directory); it is failed with the errno the kernel would
  give, and nothing is reported, since nothing ran.

None: the call goes on. The workload's first exec (its own program, chosen by the agent)
is always let through once its target exists: the caller of `judge` records it then.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Any

from guest_agent.calls import (
    O_CREAT,
    O_TMPFILE_BIT,
    Call,
    ConnectCall,
    DeniedCall,
    ExecCall,
    FileCall,
    ForeignCall,
    MapCall,
    OpenCall,
)
from guest_agent.inroot import MISSING
from guest_agent.profile import Profile, first_match, is_local


class Action(str, enum.Enum):
    ANOMALY = "anomaly"
    HOLD = "hold"
    FAIL = "fail"


@dataclass(frozen=True)
class Verdict:
    action: Action
    #: an anomaly category (protocol.ANOMALY_CATEGORIES); "code-path" for a hold, "missing"
    #: for a failed exec
    category: str
    detail: str
    syscall: str | None
    args: dict[str, Any] = field(default_factory=dict)
    #: rate anomalies are emitted at most once per reports.RATE_EMIT_PERIOD, contained every
    #: time
    rate: bool = False
    #: a hold's trigger: "exec" | "connect"
    trigger: str | None = None
    #: a failed call's errno
    error: int = 0


def anomaly(category: str, detail: str, syscall: str | None, args: dict[str, Any], *,
            rate: bool = False) -> Verdict:
    return Verdict(Action.ANOMALY, category, detail, syscall, args, rate=rate)


@dataclass(frozen=True)
class Facts:
    """What a verdict needs beyond the call and the profile."""

    #: the watch's first exec (the workload's own program) has happened
    first_exec_done: bool = True
    #: the caller and the workload's first process (0: none yet)
    pid: int = 0
    root_pid: int = 0
    #: the transient zone the caller is in, and the network that zone may use
    zone: str | None = None
    zone_network: str = "full"
    #: an exec's target looked up in the caller's view: the errno (0: it exists) and the
    #: path it resolves to ("": unknown, the call's own path stands for it)
    lookup_error: int = 0
    real_path: str = ""
    #: what the caller's fd 0 and 1 are (an exec of a shell with a socket there)
    stdio: tuple[str, str] = ("", "")
    #: an open: whether its path existed before the call
    path_exists: bool = True
    #: files the watch created over the last second, this call included when it creates one
    new_files: int = 0
    #: an open for writing of another process's memory: its /proc path ("": none)
    foreign_mem: str = ""
    #: an exec's or executable mapping's code came from the network: why ("": it did not,
    #: or provenance is off); provenance.py
    code_origin: str = ""
    #: files removed (or truncated) by the watch over the last second, this call included
    deletions: int = 0


def judge(call: Call, profile: Profile, facts: Facts) -> Verdict | None:
    """See the module docstring."""
    if isinstance(call, ForeignCall):
        return anomaly("foreign-abi", f"syscall {call.nr} through the {call.abi} ABI", None,
                       call.args)
    if isinstance(call, ExecCall):
        return judge_exec(call, profile, facts)
    if isinstance(call, DeniedCall):
        return anomaly("denied-syscall", f"{call.syscall} is in deny_syscalls", call.syscall,
                       call.args)
    if isinstance(call, ConnectCall):
        return judge_connect(call, profile, facts)
    if isinstance(call, MapCall):
        return judge_map(call, facts)
    if isinstance(call, FileCall):
        return judge_file(call, profile, facts)
    return judge_open(call, profile, facts)


def judge_map(call: MapCall, facts: Facts) -> Verdict | None:
    if not facts.code_origin:
        return None
    return anomaly("dropped-code", f"{call.syscall} of code as executable: {facts.code_origin}",
                   call.syscall, call.args)


def judge_file(call: FileCall, profile: Profile, facts: Facts) -> Verdict | None:
    if call.moves:
        return None  # a move only pins provenance (notifications.py)
    return _deletion_rate(profile, facts, call.syscall, call.args)


def _deletion_rate(profile: Profile, facts: Facts, syscall: str,
                   args: dict[str, Any]) -> Verdict | None:
    limit = profile.max_deletes_per_s
    if limit and facts.deletions > limit:
        return anomaly("deletion-rate", f"{facts.deletions} files removed or truncated in the "
                       f"last second (limit {limit:g})", syscall, args, rate=True)
    return None


def judge_exec(call: ExecCall, profile: Profile, facts: Facts) -> Verdict | None:
    path = call.path
    if facts.lookup_error in MISSING:
        return Verdict(Action.FAIL, "missing", f"exec of {path}: "
                       f"{os.strerror(facts.lookup_error)}", call.syscall, call.args,
                       error=facts.lookup_error)
    if not facts.first_exec_done:
        return None  # the workload's own program: always allowed (the agent chose it)
    args = call.args
    if call.syscall in profile.deny_syscalls:
        return anomaly("denied-syscall", f"{call.syscall} is in deny_syscalls", call.syscall,
                       args)
    real = facts.real_path or path
    if first_match(profile.shells, path) or first_match(profile.shells, real):
        for fd, target in enumerate(facts.stdio[:2]):
            if target.startswith("socket:"):
                where = "stdin" if fd == 0 else "stdout"
                return anomaly("reverse-shell",
                               f"exec of shell {path} with a socket on {where} ({target})",
                               call.syscall, args)
    # a shell on a socket is the more precise name than its stdin's network origin
    if facts.code_origin:
        return anomaly("dropped-code", f"exec of {path}: {facts.code_origin}", call.syscall,
                       args)
    verdict = profile.exec_verdict(path)
    if real != path:
        by_real = profile.exec_verdict(real)
        if verdict is None and by_real is not None and first_match(profile.deny_exec, real):
            verdict = by_real
        elif verdict is not None and by_real is None \
                and not first_match(profile.deny_exec, path):
            verdict = None
    if verdict is not None:
        return anomaly("unexpected-exec", verdict, call.syscall, args)
    transient = profile.transient
    if transient is not None and transient.on("exec") \
            and not transient.expected(path, real) and facts.zone is None:
        return Verdict(Action.HOLD, "code-path", f"exec of {path}, which was not foreseen",
                       call.syscall, args, trigger="exec")
    return None


def judge_connect(call: ConnectCall, profile: Profile, facts: Facts) -> Verdict | None:
    if call.family == "unix":
        verdict = profile.connect_verdict("unix", call.path, 0)
    elif call.family in ("inet", "inet6"):
        verdict = profile.connect_verdict(call.family, call.address, call.port)
    else:
        return None  # netlink, AF_UNSPEC (disconnect), ...: not a destination
    if verdict is not None:
        return anomaly("connect-out", verdict, "connect", call.args)
    if call.family == "unix" or is_local(call.address):
        return None
    if facts.zone is not None:
        if facts.zone_network != "full":
            return anomaly("connect-out", f"connect to {call.address}:{call.port} while "
                           f"transient zone {facts.zone}'s network is {facts.zone_network}",
                           "connect", call.args)
        return None
    transient = profile.transient
    if transient is not None and transient.on("connect") and facts.pid != facts.root_pid:
        return Verdict(Action.HOLD, "code-path", f"first connect of pid {facts.pid}, to "
                       f"{call.address}:{call.port}", "connect", call.args, trigger="connect")
    return None


def creates_file(call: OpenCall, profile: Profile, path_exists: bool) -> bool:
    """Whether the open counts against max_new_files_per_s: it makes a new file, and not
    one of the sensitive paths (that is an anomaly of its own)."""
    if profile.path_sensitive(call.path) is not None:
        return False
    return bool(call.flags & O_TMPFILE_BIT or (call.flags & O_CREAT and not path_exists))


def judge_open(call: OpenCall, profile: Profile, facts: Facts) -> Verdict | None:
    if facts.foreign_mem:
        return anomaly("injection", f"open of {facts.foreign_mem} for writing: another "
                       "process's memory", call.syscall, call.args)
    glob = profile.path_sensitive(call.path)
    if glob is not None:
        what = "write" if call.writes else "read"
        return anomaly("sensitive-path", f"{what} of {call.path} matches {glob}", call.syscall,
                       call.args)
    if facts.deletions:
        verdict = _deletion_rate(profile, facts, call.syscall, call.args)
        if verdict is not None:
            return verdict
    if not creates_file(call, profile, facts.path_exists):
        return None
    limit = profile.max_new_files_per_s
    if limit and facts.new_files > limit:
        return anomaly("new-file-rate", f"{facts.new_files} files created in the last second "
                       f"(limit {limit:g})", call.syscall, call.args, rate=True)
    return None


__all__ = ["Action", "Facts", "Verdict", "anomaly", "creates_file", "judge", "judge_connect",
           "judge_exec", "judge_file", "judge_map", "judge_open"]
