"""A watch's sensitive files, through fanotify: marks on the files and directories the
profile's sensitive_paths globs expand to (fanotify.py), made when the watch begins and
again when a profile changes them, and the opens they report.

Only a member's open is judged (members.py); one the seccomp side already reported (a
creating open of a sensitive path) is not reported twice. In a guest the events are
permission events: the open waits for the answer, so deny and kill stop the read. On the
host they are notifications: the open has happened, and kill comes after it. Every
permission event is answered, whatever happens while judging it.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

from guest_agent import fanotify
from guest_agent.containment import Containment
from guest_agent.judge import anomaly
from guest_agent.members import is_member
from guest_agent.reports import Reporter
from guest_agent.watch import Watch

#: register(fd, handler of poll events) / unregister(fd) on the poll loop
Register = Callable[[int, Callable[[int], None]], None]
Unregister = Callable[[int], None]
#: a seccomp-side report of the same open is this recent at most
SAME_OPEN = 1.0


class FileWatch:
    def __init__(self, reporter: Reporter, containment: Containment, *, permission: bool,
                 register: Register, unregister: Unregister) -> None:
        self.reporter = reporter
        self.containment = containment
        self.permission = permission
        self._register = register
        self._unregister = unregister
        #: sensitive-path marks reused by the next workload while their directories stay
        #: unchanged (a warm guest's start would spend most of its time walking them)
        self._expanded = fanotify.ExpandCache()

    def mark(self, watch: Watch, warnings: list[str]) -> None:
        """Give `watch` a fanotify group marking its sensitive paths (none when it has
        none, or nothing matches yet); what could not be done goes to `warnings`."""
        if not watch.profile.sensitive_paths:
            return
        marks, notes = self._expanded.expand(watch.profile.sensitive_paths)
        warnings.extend(notes)
        if not marks:
            warnings.append("sensitive paths: nothing to mark yet (no match on disk)")
            return
        try:
            group = fanotify.Group(permission=self.permission)
        except OSError as e:
            warnings.append(f"fanotify unavailable ({e}): sensitive reads are not watched")
            return
        failed = 0
        for path, is_dir in marks:
            try:
                group.mark(path, is_dir)
            except OSError:
                failed += 1
        if failed:
            warnings.append(f"sensitive paths: {failed} of {len(marks)} marks failed")
        watch.group = group
        self._register(group.fd, functools.partial(self.on_events, watch, group))

    def unmark(self, watch: Watch) -> None:
        group, watch.group = watch.group, None
        if group is not None:
            self._unregister(group.fd)
            group.close()

    def on_events(self, watch: Watch, group: fanotify.Group, _ev: int) -> None:
        for event in group.events():
            allow = True
            try:
                if event.overflow:
                    watch.lost += 1
                    continue
                if not is_member(watch, event.pid):
                    continue
                watch.file_events += 1
                glob = watch.profile.path_sensitive(event.path) if event.path else None
                if glob is None:
                    continue
                seen = watch.recent_sensitive.pop((event.pid, event.path), None)
                if seen is not None and time.monotonic() - seen < SAME_OPEN:
                    continue
                act_mono, act_time = time.monotonic(), time.time()
                verdict = anomaly("sensitive-path", f"read of {event.path} matches {glob}",
                                  None, {"path": event.path})
                allow = self.containment.open(watch, group, event, verdict, act_time,
                                              act_mono)
            except Exception:
                self.reporter.failed(f"handling a fanotify event of {watch.id}")
                watch.errors += 1
            finally:
                if event.fd >= 0:
                    group.respond(event, allow)


__all__ = ["FileWatch"]
