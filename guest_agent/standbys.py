"""The agent's ``standby`` requests: preparing the one standby (standby.py says what a
standby is) and offering it the next ``start`` that names it.

A standby is refused at once when its profile or user is bad, else started watched on a
thread of its own (the loader's start must not hold the reader) and announced with
``standby_ready`` once its loader is ready. One at a time: a newer one replaces (kills)
the older, and a standby serves one request only, whatever happens. One that will serve
nobody has its watch ended first: its fanotify marks would otherwise answer opens beside
the next workload's.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any, Callable

from guest_agent import seccomp
from guest_agent.monitor import Monitor
from guest_agent.profile import Profile, ProfileError
from guest_agent.protocol import Message
from guest_agent.standby import LOADER, Standby, StandbyError, request_socket
from guest_agent.workload import StartError, build_env, default_cwd, lookup_user, spawn

log = logging.getLogger("guest_agent")

Send = Callable[[Message], None]


def error_message(mid: str | None, text: str) -> Message:
    msg: Message = {"type": "error", "message": text}
    if mid is not None:
        msg["id"] = mid
    return msg


def watch_preexec(monitor: Monitor, wid: str, profile_dict: Any) -> Callable[[], None]:
    """The preexec_fn that puts a workload's first process under watch: it installs the
    seccomp filter just before the exec and hands the listener to the monitor, whose
    threads already run (Popen returns only once the exec was let through). Raises
    ProfileError or StartError: nothing may start then."""
    profile = Profile.from_dict(profile_dict)
    why = seccomp.available()
    if why is not None:  # fail closed: a watch was asked for and cannot be had
        raise StartError(f"monitoring unavailable: {why}")
    installer = seccomp.Installer(profile)
    header = json.dumps({"id": wid, "profile": profile.to_dict()}).encode("utf-8")
    fd = monitor.child_socket.fileno()

    def preexec() -> None:
        installer.install_and_hand_over(fd, header)

    return preexec


class Standbys:
    def __init__(self, monitor: Monitor, send: Send, busy: Callable[[str], bool]) -> None:
        self.monitor = monitor
        self._send = send
        #: whether an id is a running workload's
        self._busy = busy
        self._lock = threading.Lock()
        self._standby: Standby | None = None

    def _swap(self, new: Standby | None) -> Standby | None:
        with self._lock:
            old, self._standby = self._standby, new
        return old

    def discard_idle(self) -> None:
        """End the waiting standby, if any (a start that does not want it)."""
        old = self._swap(None)
        if old is not None:
            self.drop(old)

    def drop(self, standby: Standby) -> None:
        """Kill a standby that will serve nobody, its watch ended first."""
        self.monitor.drop(standby.id)
        standby.discard()

    def on_standby(self, msg: Message) -> None:
        sid = msg["id"]
        mode = msg["mode"]
        python = msg.get("python") or "python3"
        program = msg.get("program") if mode == "exec" else python
        if not program:
            self._send(error_message(sid, f"standby {sid} not prepared: exec mode needs a "
                                          "program"))
            return
        try:
            preexec = watch_preexec(self.monitor, sid, msg["monitor"])
            entry = lookup_user(msg["user"]) if msg.get("user") is not None else None
        except (ProfileError, StartError) as e:
            self._send(error_message(sid, f"standby {sid} not prepared: {e}"))
            return
        busy = self._busy(sid)
        self.discard_idle()  # one at a time: the host asks for the one it will use
        if busy:
            self._send(error_message(sid, f"standby id {sid} is a workload's id"))
            return
        threading.Thread(target=self._prepare, args=(sid, mode, python, program, entry,
                                                     msg.get("user"), preexec),
                         name="standby-" + sid, daemon=True).start()

    def _prepare(self, sid: str, mode: str, python: str, program: str, entry: Any,
                 user: Any, preexec: Callable[[], None]) -> None:
        mine, theirs = request_socket()
        try:
            try:
                popen = spawn([python, "-c", LOADER, str(theirs.fileno())], None, None, user,
                              preexec_fn=preexec, pass_fds=(theirs.fileno(),))
            finally:
                theirs.close()
        except StartError as e:
            mine.close()
            self._send(error_message(sid, f"standby {sid} not prepared: {e}"))
            return
        standby = Standby(sid, mode, program, entry.pw_uid if entry else os.getuid(), popen,
                          mine)
        old = self._swap(standby)
        if old is not None:
            self.drop(old)
        try:
            standby.wait_ready()
        except StandbyError as e:
            with self._lock:
                if self._standby is standby:
                    self._standby = None
            self.drop(standby)
            self._send(error_message(sid, f"standby {sid} not prepared: {e}"))
            return
        log.info("standby %s ready (pid %d, %s mode, %s)", sid, standby.pid, mode, program)
        self._send({"type": "standby_ready", "id": sid, "pid": standby.pid,
                    "prepared": standby.prepared, "mode": mode})

    def use(self, wid: str, msg: Message, env: dict[str, str] | None) -> tuple[Any, Message]:
        """(the standby's process, note for ``started``) when it takes the request; (None,
        note with the reason) when the request must start normally. Raises ProfileError
        for a bad profile (as a normal start would)."""
        standby = self._swap(None)  # one request only, whatever happens
        if standby is not None and standby.id != msg["standby"]:
            self.drop(standby)
            standby = None
        if standby is None:
            return None, {"used": False, "reason": "no standby " + msg["standby"] + " here"}
        note: Message = standby.describe()
        why: str | None
        monitor = msg.get("monitor")
        if monitor is None:
            why = "the request is not monitored"
            profile = None
        else:
            try:
                profile = Profile.from_dict(monitor)
            except ProfileError:
                self.drop(standby)
                raise
            installed = self.monitor.installed(standby.id)
            why = "the standby's watch ended" if installed is None else None
            try:
                entry = lookup_user(msg["user"]) if msg.get("user") is not None else None
            except StartError:
                self.drop(standby)
                raise
            if why is None:
                why = standby.misfit(msg["argv"], entry.pw_uid if entry else os.getuid(),
                                     msg.get("stdout", "stream"), msg.get("stderr", "stream"),
                                     env, seccomp.notified_numbers(profile) <= (installed or set()))
        if why is not None or profile is None:
            self.drop(standby)
            note.update(used=False, reason=why or "the request is not monitored")
            log.info("standby %s not used for %s: %s", standby.id, wid, note["reason"])
            return None, note
        full_env = build_env(env, entry)
        try:
            self.monitor.rename(standby.id, wid, reexec=standby.mode == "exec")
            self.monitor.update(wid, profile)
            standby.hand_over(list(msg["argv"]), full_env, default_cwd(msg.get("cwd"), entry))
        except (KeyError, StandbyError) as e:
            self.drop(standby)
            self.monitor.drop(wid)
            raise StartError(f"the standby failed: {e}") from None
        note["used"] = True
        return standby.popen, note

    def close(self) -> None:
        self.discard_idle()


__all__ = ["Send", "Standbys", "error_message", "watch_preexec"]
