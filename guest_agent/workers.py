"""Requests the agent carries out off its reader thread, which must never wait on one:
``probe`` (a thread each, at most MAX_PROBES at once: probes.py), answered on the urgent
lane by a ``probe_result``, whatever happens.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from guest_agent.probes import PROBES
from guest_agent.protocol import Message

log = logging.getLogger("guest_agent")

MAX_PROBES = 8

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


__all__ = ["MAX_PROBES", "Probes"]
