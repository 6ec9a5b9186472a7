"""The agent's side of the channel requests: the environment a workload with a channel
gets, the host's ``channel_deliver`` and ``channel_verdict``, and (beside a cgroup zone)
the listening sockets the controller hands over. The endpoint itself (endpoint.py) serves
the workload's connections.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import threading
from typing import Callable

from guest_agent.endpoint import Endpoint, bind_listener
from guest_agent.protocol import Message

log = logging.getLogger("guest_agent")


class ChannelRequests:
    def __init__(self, endpoint: Endpoint, send: Callable[[Message], None],
                 stop: threading.Event, hand: socket.socket | None = None) -> None:
        self.endpoint = endpoint
        self._send = send
        self.stop = stop
        #: host mode: an inherited SOCK_SEQPACKET socket on which the controller hands over
        #: the listening channel socket it bound in the zone's network namespace
        self.hand = hand

    def env_for(self, name: str, env: dict[str, str] | None) -> dict[str, str]:
        """The workload's environment with its channel: the endpoint listens (bound here,
        in the guest's network namespace, on the first start that asks) and is named."""
        if not self.endpoint.listening:
            self.endpoint.add_listener(bind_listener(), name)
        self.endpoint.name = name
        out = dict(env or {})
        extra = self.endpoint.env()
        path = extra.pop("PYTHONPATH")
        out["PYTHONPATH"] = path + (":" + out["PYTHONPATH"] if out.get("PYTHONPATH") else "")
        out.update(extra)
        return out

    def on_deliver(self, msg: Message) -> None:
        problem = self.endpoint.on_deliver(msg)
        if problem is not None:
            self._send({"type": "error", "id": msg["id"], "kind": "channel",
                        "message": problem})

    def on_verdict(self, msg: Message) -> None:
        self.endpoint.on_verdict(msg)

    def hand_loop(self) -> None:
        """Host mode: take the listening sockets the controller hands over (one per zone
        start with a channel), with a header naming the zone."""
        hand = self.hand
        if hand is None:
            return
        while not self.stop.is_set():
            try:
                if not select.select([hand], [], [], 0.5)[0]:
                    continue
                data, fds, _flags, _addr = socket.recv_fds(hand, 4096, 2)
            except (OSError, ValueError):
                return
            if not data and not fds:
                return  # the controller closed its end
            try:
                header = json.loads(data.decode("utf-8"))
                name = header.get("name") if isinstance(header, dict) else None
            except ValueError:
                name = None
            for fd in fds[1:]:
                os.close(fd)
            if not fds:
                log.warning("channel hand-over without a socket: %r", data[:200])
                continue
            sock = socket.socket(fileno=fds[0])
            self.endpoint.add_listener(sock, name if isinstance(name, str) else None)


__all__ = ["ChannelRequests"]
