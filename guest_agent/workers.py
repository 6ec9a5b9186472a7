"""Requests the agent carries out off its reader thread, which must never wait on one:
``probe`` (a thread each, at most MAX_PROBES at once: probes.py) and ``admin`` (one worker
thread, in order, at most MAX_ADMIN_QUEUED waiting: admin.py; one at a time, so a scrub
never races another change of the same guest). Each is answered on the urgent lane, by a
``probe_result`` or an ``admin_result``, whatever happens.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

from guest_agent import admin
from guest_agent.probes import PROBES
from guest_agent.protocol import Message

log = logging.getLogger("guest_agent")

MAX_PROBES = 8
MAX_ADMIN_QUEUED = 16

Send = Callable[[Message], None]


class Probes:
    def __init__(self, send: Send) -> None:
        self._send = send
        self._slots = threading.BoundedSemaphore(MAX_PROBES)

    def on_probe(self, msg: Message) -> None:
        kind = msg["kind"]
        if kind not in PROBES:
            self._send({"type": "probe_result", "id": msg["id"], "ok": False,
                        "error": "unknown probe kind {!r} (this agent knows {})".format(
                            kind[:40], ", ".join(sorted(PROBES)))})
            return
        if not self._slots.acquire(blocking=False):
            self._send({"type": "probe_result", "id": msg["id"], "ok": False,
                        "error": f"{MAX_PROBES} probes already running"})
            return
        threading.Thread(target=self._run, args=(msg,), name="probe-" + msg["id"],
                         daemon=True).start()

    def _run(self, msg: Message) -> None:
        try:
            result = PROBES[msg["kind"]](msg.get("args") or {})
            reply: Message = {"type": "probe_result", "id": msg["id"], "ok": True,
                              "result": result}
        except Exception as e:
            reply = {"type": "probe_result", "id": msg["id"], "ok": False,
                     "error": f"{type(e).__name__}: {e}"}
        finally:
            self._slots.release()
        self._send(reply)


class AdminRequests:
    def __init__(self, send: Send, system: admin.System | None = None) -> None:
        self._send = send
        self.system = system or admin.System()
        self._queue: queue.Queue[Message | None] = queue.Queue(MAX_ADMIN_QUEUED)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def on_admin(self, msg: Message) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="admin",
                                                daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait(msg)
        except queue.Full:
            self._send(self._failed(msg, f"{MAX_ADMIN_QUEUED} admin requests already wait"))

    @staticmethod
    def _failed(msg: Message, text: str) -> Message:
        return {"type": "admin_result", "id": msg["id"], "op": msg["op"], "ok": False,
                "error": text}

    def _work(self) -> None:
        while True:
            msg = self._queue.get()
            if msg is None:
                return
            try:
                result = admin.perform(msg, self.system)
                reply: Message = {"type": "admin_result", "id": msg["id"], "op": msg["op"],
                                  "ok": True, **result}
                log.info("admin %s %s: %s", msg["op"], msg["id"], result)
            except admin.AdminError as e:
                reply = self._failed(msg, str(e))
                log.warning("admin %s %s failed: %s", msg["op"], msg["id"], e)
            except Exception as e:
                log.exception("admin %s %s", msg["op"], msg["id"])
                reply = self._failed(msg, f"{type(e).__name__}: {e}")
            self._send(reply)

    def close(self) -> None:
        with self._lock:
            thread = self._thread
        if thread is not None:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                return  # a daemon thread: it ends with the agent


__all__ = ["MAX_ADMIN_QUEUED", "MAX_PROBES", "AdminRequests", "Probes"]
