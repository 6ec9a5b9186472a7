"""The agent's writer thread: the one owner of the port's write side. It numbers messages
(``seq``) as it sends them, greets each new connection with a fresh hello before anything
else (a blank line first, which ends whatever a torn write left on the host's side), puts
back what a lost connection did not take, and skips the seq numbers of messages the
outbox had to discard so the host sees the gap.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from guest_agent.outbox import Outbox
from guest_agent.port import Disconnected, Port, Stopped
from guest_agent.protocol import Message, ProtocolError, encode

log = logging.getLogger("guest_agent")


def encode_or_explain(msg: Message) -> bytes:
    """`msg` encoded; one that cannot be (too large, or a bug) becomes a message saying so,
    answering the same request: a failed ``probe_result`` or ``admin_result``, else an
    ``error``."""
    try:
        return encode(msg)
    except ProtocolError as e:
        log.warning("cannot send %s: %s", msg.get("type"), e)
        text = "agent could not send its {} message: {}".format(msg.get("type"), e.detail)
        repl: Message = {"type": "error", "seq": msg["seq"], "kind": e.kind, "message": text}
        if isinstance(msg.get("id"), str):
            if msg.get("type") == "probe_result":
                repl = {"type": "probe_result", "seq": msg["seq"], "id": msg["id"],
                        "ok": False, "error": text}
            elif msg.get("type") == "admin_result" and isinstance(msg.get("op"), str):
                repl = {"type": "admin_result", "seq": msg["seq"], "id": msg["id"],
                        "op": msg["op"], "ok": False, "error": text}
            else:
                repl["id"] = msg["id"]
        return encode(repl)


class Writer:
    def __init__(self, port: Port, outbox: Outbox, stop: threading.Event,
                 hello: Callable[[], Message], sent_exit: Callable[[str], None]) -> None:
        self.port = port
        self.outbox = outbox
        self.stop = stop
        self._hello = hello
        #: told the id of each workload whose ``exit`` went out
        self._sent_exit = sent_exit
        self._seq = 0

    def write(self, msg: Message, generation: int, prefix: bytes = b"") -> bool:
        """Number `msg` and send it. Discarded messages skip their numbers here, though
        never in a hello: the host takes a hello's seq as its base and would miss the gap."""
        gap = self.outbox.pending_gap() if msg["type"] != "hello" else 0
        seq = self._seq + gap
        data = prefix + encode_or_explain(dict(msg, seq=seq))
        try:
            self.port.write(data, generation, self.stop)
        except (Disconnected, Stopped):
            return False
        self._seq = seq + 1
        self.outbox.gap_skipped(gap)
        if msg["type"] == "exit":
            self._sent_exit(msg["id"])
        return True

    def run(self) -> None:
        greeted = 0
        while not self.stop.is_set():
            generation = self.port.wait_generation(self.stop, 0.5)
            if generation is None:
                continue
            if generation != greeted:
                if self.write(self._hello(), generation, prefix=b"\n"):
                    greeted = generation
                continue
            item = self.outbox.get(0.2)
            if item is None:
                continue
            lane, msg, size = item
            if not self.write(msg, generation):
                self.outbox.put_back(lane, msg, size)


__all__ = ["Writer", "encode_or_explain"]
