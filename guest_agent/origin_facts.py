"""The provenance facts of one notified call (provenance.py keeps the marks; judge.py
decides): where the code an exec or an executable mapping would run came from, and what a
connect or an open for writing marks.

An exec's code is its program, an interpreter's script argument or (reading its program
from stdin) its stdin, and each library its environment preloads.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from guest_agent.calls import ConnectCall, ExecCall, MapCall, preloads
from guest_agent.procfs import AT_FDCWD, Mem, ProcReadError, program_of, resolve
from guest_agent.profile import first_match, is_local
from guest_agent.provenance import Origin, own_fd, script_of
from guest_agent.watch import Watch


def exec_origin(watch: Watch, call: ExecCall, pid: int, real: str, mem: Mem) -> str:
    """Why the code `call` would run came from the network ("": it did not)."""
    prov = watch.provenance
    if not watch.profile.provenance or not prov.active:
        return ""
    found: Origin | None
    if call.by_fd:
        found = prov.fd_origin(pid, call.dirfd)
    else:
        # /proc/self/fd/N as the caller means it, not as the agent would resolve it
        named = call.path if own_fd(call.path) is not None else real or call.path
        found = prov.file_origin(pid, named)
    if found is None and _interpreter(watch, real or call.path, call.path):
        script = script_of(call.argv)
        if script == "-":
            found = prov.stdin_origin(pid)
            if found is not None:
                found = Origin(f"the program it reads on stdin: {found.detail}")
        elif script:
            found = prov.file_origin(pid, resolve(pid, AT_FDCWD, script))
            if found is not None:
                found = Origin(f"its script {script}: {found.detail}")
    if found is None:
        try:
            libraries = preloads(call, mem)
        except ProcReadError:
            libraries = []
        for library in libraries:
            found = prov.file_origin(pid, resolve(pid, AT_FDCWD, library))
            if found is not None:
                found = Origin(f"it preloads {library}: {found.detail}")
                break
    return found.detail if found is not None else ""


def map_origin(watch: Watch, call: MapCall, pid: int) -> str:
    prov = watch.provenance
    if not watch.profile.provenance or not prov.active or call.anonymous:
        return ""
    found = prov.fd_origin(pid, call.fd) if call.syscall == "mmap" \
        else prov.mapping_origin(pid, call.addr)
    return found.detail if found is not None else ""


def _interpreter(watch: Watch, real: str, path: str) -> bool:
    globs = watch.profile.interpreters
    return first_match(globs, real) is not None or first_match(globs, path) is not None


def connected(watch: Watch, call: ConnectCall, pid: int,
              zone: Iterable[int]) -> list[tuple[int, str]]:
    """A connect the verdict let through: a connect out marks `pid` a receiver. Returns the
    interpreters of `zone` that now run a program read from what it receives: (pid, why)."""
    profile = watch.profile
    if not profile.provenance or call.family not in ("inet", "inet6") \
            or is_local(call.address) or profile.trusted_origin(call.address, call.port):
        return []
    shown = f"[{call.address}]:{call.port}" if call.family == "inet6" \
        else f"{call.address}:{call.port}"
    fed = watch.provenance.received(pid, f"connected to {shown}", zone)
    out = []
    for reader, why in fed:
        program = program_of(reader)
        if program and _interpreter(watch, os.path.realpath(program), program) \
                and script_of(_cmdline(reader)) == "-" \
                and watch.provenance.stdin_origin(reader) is not None:
            out.append((reader, f"{program} (pid {reader}) runs the program it reads on stdin, "
                                f"which {why.removeprefix('reads ')}"))
    return out


def _cmdline(pid: int) -> tuple[str, ...]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(8192)
    except OSError:
        return ()
    return tuple(os.fsdecode(a) for a in raw.split(b"\0") if a)


__all__ = ["connected", "exec_origin", "map_origin"]
