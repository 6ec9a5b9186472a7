"""A watch's sensitive files, through fanotify: marks on the files and directories the
profile's sensitive_paths globs expand to (fanotify.py), made when the watch begins and
again when a profile changes them, and the opens they report.

Only a member's open is judged (members.py); one the seccomp side already reported (a
creating open of a sensitive path) is not reported twice. In a guest the events are
permission events: the open waits for the answer, so deny and kill stop the read. On the
host they are notifications: the open has happened, and kill comes after it; which is why
beside a cgroup zone its sensitive files are covered in its view by its tripwire
(hvtsm/zones/cgroup/tripwire.py, profile.tripwires), a file only the zone reaches, marked
here with permission events: every open of it is an attempt on the file it covers,
decided before any byte is read, whether the zone could have read the real file or not.
Every permission event is answered, whatever happens while judging it.
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
        none, or nothing matches yet), and one with permission marks on its tripwires;
        what could not be done goes to `warnings`."""
        self._mark_tripwires(watch, warnings)
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
        for group in (watch.group, watch.tripwire_group):
            if group is not None:
                self._unregister(group.fd)
                group.close()
        watch.group = watch.tripwire_group = None

    def _mark_tripwires(self, watch: Watch, warnings: list[str]) -> None:
        if not watch.profile.tripwires:
            return
        try:
            group = fanotify.Group(permission=True)
            for path in watch.profile.tripwires:
                group.mark(path, False)
        except OSError as e:
            # the zone's view has the tripwires all the same: an open reads an empty file
            warnings.append(f"tripwires cannot be watched ({e}): attempts on sensitive "
                            "files are not seen")
            return
        watch.tripwire_group = group
        self._register(group.fd, functools.partial(self.on_tripwire, watch, group))

    def on_tripwire(self, watch: Watch, group: fanotify.Group, _ev: int) -> None:
        """Every open of a tripwire is an attempt on the sensitive file it stands on (its
        path, as the zone names it, is the event's): only the zone reaches it, so no
        membership is asked, and a process gone since is reported all the same."""
        for event in group.events():
            allow = False
            try:
                if event.overflow:
                    watch.lost += 1
                    continue
                watch.file_events += 1
                act_mono, act_time = time.monotonic(), time.time()
                path = event.path or "a sensitive file"
                glob = watch.profile.path_sensitive(event.path) if event.path else None
                verdict = anomaly(
                    "sensitive-path", f"attempt to open {path}"
                    + (f" (matches {glob})" if glob else "")
                    + ": the zone may not read it, and no byte of it was in reach",
                    None, {"path": path, "attempt": True})
                allow = self.containment.open(watch, group, event, verdict, act_time,
                                              act_mono)
            except Exception:
                self.reporter.failed(f"handling a tripwire event of {watch.id}")
                watch.errors += 1
            finally:
                if event.fd >= 0:
                    group.respond(event, allow)

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
