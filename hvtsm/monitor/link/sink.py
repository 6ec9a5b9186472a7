"""Where a workload's output goes, without ever blocking the link's reader.

Each destination (a pipe the caller reads, or a file descriptor such as the CLI's own
stdout) gets its own writer thread, started on first use, with at most `limit` bytes
waiting; beyond that output is dropped and counted (the workload reports it once).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import subprocess
import threading
from typing import IO

from hvtsm.monitor.link.limits import SINK_LIMIT

log = logging.getLogger(__name__)


class OutputSink:
    """One output stream's destination, written by its own thread (started on first use)."""

    def __init__(self, fd: int, *, owned: bool, label: str, limit: int = SINK_LIMIT) -> None:
        self.fd = fd
        self.owned = owned
        self.label = label
        self.limit = limit
        self._cond = threading.Condition()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._closing = False
        self._thread: threading.Thread | None = None
        #: bytes that never reached the destination (limit exceeded, reader gone)
        self.dropped = 0
        self.broken = False

    def write(self, data: bytes) -> bool:
        """Queue `data`; False if it was dropped."""
        with self._cond:
            if self._closing or self.broken or self._queued + len(data) > self.limit:
                self.dropped += len(data)
                return self.broken or self._closing  # only overflow is news
            self._chunks.append(data)
            self._queued += len(data)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"sink-{self.label}",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()
            return True

    def finish(self) -> None:
        """No more output: close the destination (if ours) once what is queued is written."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify()
            thread = self._thread
        if thread is None:
            self._close()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._chunks and not self._closing:
                    self._cond.wait()
                if not self._chunks:
                    break
                data = self._chunks.popleft()
                self._queued -= len(data)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self.fd, view):]
            except OSError as e:  # EPIPE: the reader closed its end
                log.debug("output %s: %s", self.label, e)
                with self._cond:
                    self.broken = True
                    self.dropped += len(view) + self._queued
                    self._chunks.clear()
                    self._queued = 0
        self._close()

    def _close(self) -> None:
        if self.owned:
            with contextlib.suppress(OSError):
                os.close(self.fd)


def check_target(target: int | None, *, stderr: bool = False) -> None:
    """ValueError unless `target` is a subprocess-style output target this link serves."""
    ok = target is None or target in (subprocess.PIPE, subprocess.DEVNULL) or (
        isinstance(target, int) and target >= 0) or (stderr and target == subprocess.STDOUT)
    if not ok:
        raise ValueError(f"output target must be PIPE, DEVNULL, None, a file descriptor "
                         f"(or STDOUT for stderr), not {target!r}")


def sink_for(target: int | None, label: str, *,
             own: bool = False) -> tuple[OutputSink | None, IO[bytes] | None]:
    """subprocess-style target -> (sink, readable file for the caller). `own`: a
    descriptor target is the sink's to close once the output is done."""
    if target is None or target == subprocess.DEVNULL:
        return None, None
    if target == subprocess.PIPE:
        r, w = os.pipe2(os.O_CLOEXEC)
        return OutputSink(w, owned=True, label=label), open(r, "rb")
    check_target(target)
    assert target is not None
    return OutputSink(target, owned=own, label=label), None
