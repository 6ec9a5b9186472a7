"""The workload's end of its zone's channels: send messages to other zones of its group and
receive theirs. Every message goes through the host's broker, which checks the policy's
grants and audits it; the workload only ever talks to its own agent.

    from guest_agent.channel import open_channel, ChannelRefused
    ch = open_channel()              # where from: HVTSM_CHANNEL in the environment
    ch.send("parse", b"raw bytes")   # waits for the broker's verdict; ChannelRefused(.reason)
    sender, data = ch.recv(timeout=30)

or from a shell: ``python3 -m guest_agent.channel send TO < data`` and
``python3 -m guest_agent.channel recv [--timeout S] > data`` (the sender's name goes to
stderr); exit status 0 ok, 3 refused, 4 timeout, 2 usage or no channel.

Standard library only, Python >= 3.9 (it runs inside zones and guests).

Between this module and the agent (a unix stream socket, one connection per Channel):
frames of a 4-byte big-endian header length, a JSON header, then ``size`` bytes of payload
for the ops that carry one. Client -> agent: ``{"op": "send", "to", "size"}`` + payload,
``{"op": "recv", "timeout"}``. Agent -> client: ``{"op": "ready", "name"}`` once on connect,
``{"op": "verdict", "verdict", "reason"}``, ``{"op": "message", "from", "size"}`` + payload,
``{"op": "timeout"}``, ``{"op": "error", "reason"}``. Each request carries ``ref`` (a
number the client counts up); the answer repeats it, so an answer that arrives after its
request timed out is recognised and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import sys
import time
from typing import Any

from guest_agent.protocol import CHANNEL_ENV, CHANNEL_MAX_BYTES, CHANNEL_NAME_ENV, MAX_ID_CHARS

#: the longest frame header either side accepts
MAX_HEADER = 4096
#: extra time a receive waits beyond its own timeout for the agent's answer
RECV_GRACE = 5.0
#: how long opening a channel waits for the agent's greeting
OPEN_TIMEOUT = 5.0

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_TIMEOUT = 4

_LEN = struct.Struct(">I")


class ChannelError(Exception):
    """The channel cannot be used (the agent went away, an answer made no sense)."""


class ChannelRefused(ChannelError):
    """The broker refused the message; ``reason`` says why (policy, size, rate, receiver)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"refused: {reason}")
        self.reason = reason


class ChannelUnavailable(ChannelError):
    """This process has no channel (HVTSM_CHANNEL unset, or nothing listens there)."""


# --- framing (the agent's endpoint uses the same functions) --------------------------------


def pack(header: dict[str, Any], payload: bytes = b"") -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if len(raw) > MAX_HEADER:
        raise ValueError(f"frame header of {len(raw)} bytes (limit {MAX_HEADER})")
    return _LEN.pack(len(raw)) + raw + payload


def read_exact(sock: socket.socket, n: int, deadline: float | None) -> bytes:
    """`n` bytes from `sock`; TimeoutError past `deadline` (time.monotonic()), EOFError when
    the peer closed first."""
    chunks = []
    left = n
    while left:
        wait_for(sock, deadline)
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError("the peer closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def wait_for(sock: socket.socket, deadline: float | None) -> None:
    if deadline is None:
        return
    left = deadline - time.monotonic()
    if left <= 0 or not select.select([sock], [], [], left)[0]:
        raise TimeoutError("timed out")


def read_header(sock: socket.socket, deadline: float | None) -> dict[str, Any]:
    (length,) = _LEN.unpack(read_exact(sock, 4, deadline))
    if length > MAX_HEADER:
        raise ValueError(f"frame header of {length} bytes (limit {MAX_HEADER})")
    header = json.loads(read_exact(sock, length, deadline).decode("utf-8"))
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise ValueError("a frame header must be an object with an op")
    return header


def payload_size(header: dict[str, Any], limit: int = CHANNEL_MAX_BYTES * 4) -> int:
    size = header.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= limit:
        raise ValueError(f"frame size {str(size)[:20]} is not a byte count up to {limit}")
    return size


# --- the client ----------------------------------------------------------------------------


class Channel:
    """One connection to the zone's agent. Not for use by several threads at once."""

    def __init__(self, sock: socket.socket, name: str | None = None) -> None:
        self._sock = sock
        #: this zone's name among its group (what receivers see as the sender)
        self.name = name
        self._ref = 0
        self._broken: str | None = None

    def _check(self) -> None:
        if self._sock.fileno() < 0:
            raise ChannelError("the channel is closed")
        if self._broken is not None:
            raise ChannelError(f"the channel is out of step ({self._broken}): open a new one")

    def _answer(self, ref: int, deadline: float | None) -> tuple[dict[str, Any], bytes]:
        """The answer to request `ref` (answers to earlier, timed-out requests are skipped)."""
        while True:
            try:
                header = read_header(self._sock, deadline)
                size = payload_size(header) if header["op"] == "message" else 0
                payload = read_exact(self._sock, size, deadline) if size else b""
            except TimeoutError:
                raise
            except (EOFError, OSError, ValueError) as e:
                self._broken = str(e)
                raise ChannelError(f"the agent's end of the channel failed: {e}") from None
            if header.get("ref") == ref:
                return header, payload
            if header["op"] == "message":  # a message for a receive we gave up on: lost
                self._broken = "a message arrived for an abandoned receive"
                raise ChannelError("a message arrived for an earlier receive that timed out")

    def send(self, to: str, data: bytes, timeout: float = 10.0) -> None:
        """Send `data` to the zone named `to` and wait for the broker's verdict. Raises
        ChannelRefused (with .reason), TimeoutError, ChannelError."""
        self._check()
        if not isinstance(to, str) or not to or len(to) > MAX_ID_CHARS:
            raise ValueError(f"a receiver is a zone name of 1 to {MAX_ID_CHARS} characters")
        data = bytes(data)
        self._ref += 1
        deadline = time.monotonic() + timeout
        frame = pack({"op": "send", "ref": self._ref, "to": to, "size": len(data)})
        try:
            self._sock.settimeout(max(0.001, deadline - time.monotonic()))
            self._sock.sendall(frame)
            view = memoryview(data)
            while view:  # in slices, so the deadline is looked at while the agent reads
                self._sock.settimeout(max(0.001, deadline - time.monotonic()))
                view = view[self._sock.send(view[:1 << 20]):]
        except socket.timeout:
            self._broken = "a send timed out half-written"
            raise TimeoutError(f"the agent did not take the message within {timeout:g} s") \
                from None
        except OSError as e:
            self._broken = str(e)
            raise ChannelError(f"cannot write to the channel: {e}") from None
        finally:
            self._sock.settimeout(None)
        try:
            header, _ = self._answer(self._ref, deadline)
        except TimeoutError:
            raise TimeoutError(f"no verdict on the message to {to} within {timeout:g} s") \
                from None
        if header["op"] == "verdict" and header.get("verdict") == "delivered":
            return
        reason = str(header.get("reason") or header["op"])
        if header["op"] == "verdict":
            raise ChannelRefused(reason)
        raise ChannelError(reason)

    def recv(self, timeout: float | None = None) -> tuple[str, bytes]:
        """The next message for this zone: (sender's name, data). TimeoutError when none
        came within `timeout` seconds (None: wait for ever)."""
        self._check()
        self._ref += 1
        try:
            self._sock.sendall(pack({"op": "recv", "ref": self._ref, "timeout": timeout}))
        except OSError as e:
            self._broken = str(e)
            raise ChannelError(f"cannot write to the channel: {e}") from None
        deadline = None if timeout is None else time.monotonic() + timeout + RECV_GRACE
        try:
            header, payload = self._answer(self._ref, deadline)
        except TimeoutError:
            self._broken = "the agent did not answer a receive"
            raise TimeoutError("the agent did not answer within the receive's timeout") \
                from None
        if header["op"] == "message":
            return str(header.get("from")), payload
        if header["op"] == "timeout":
            raise TimeoutError(f"no message within {timeout:g} s" if timeout is not None
                               else "no message")
        raise ChannelError(str(header.get("reason") or header["op"]))

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()


def open_channel() -> Channel:
    """The channel this process's zone gives it (HVTSM_CHANNEL); ChannelUnavailable if none."""
    where = os.environ.get(CHANNEL_ENV)
    if not where:
        raise ChannelUnavailable(f"{CHANNEL_ENV} is not set: this zone was started without "
                                 "channels (give the zone a name)")
    if not where.startswith("unix:") or len(where) <= 5:
        raise ChannelUnavailable(f"{CHANNEL_ENV}={where[:80]!r} is not unix:PATH or "
                                 "unix:@ABSTRACT")
    path = where[5:]
    address = "\0" + path[1:] if path.startswith("@") else path
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(OPEN_TIMEOUT)
        sock.connect(address)
        sock.settimeout(None)
        header = read_header(sock, time.monotonic() + OPEN_TIMEOUT)
    except (OSError, EOFError, ValueError, TimeoutError) as e:
        sock.close()
        raise ChannelUnavailable(f"no channel endpoint at {where}: {e}") from None
    if header.get("op") != "ready":
        sock.close()
        raise ChannelUnavailable(f"the endpoint at {where} refused: "
                                 f"{str(header.get('reason') or header.get('op'))[:200]}")
    name = header.get("name")
    return Channel(sock, name if isinstance(name, str) else os.environ.get(CHANNEL_NAME_ENV))


# --- the command line ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m guest_agent.channel",
        description="send to or receive from another zone of this zone's group",
        epilog="exit status: 0 ok, 3 refused, 4 timeout, 2 usage or no channel")
    sub = parser.add_subparsers(dest="command")
    send = sub.add_parser("send", help="send stdin to the zone named TO")
    send.add_argument("to", metavar="TO")
    send.add_argument("--timeout", type=float, default=10.0, metavar="S")
    recv = sub.add_parser("recv", help="write the next message to stdout (sender to stderr)")
    recv.add_argument("--timeout", type=float, default=None, metavar="S")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    if args.command is None:
        parser.print_usage(sys.stderr)
        return EXIT_USAGE
    try:
        channel = open_channel()
    except ChannelUnavailable as e:
        print(f"channel: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "send":
            channel.send(args.to, sys.stdin.buffer.read(), timeout=args.timeout)
            return EXIT_OK
        sender, data = channel.recv(timeout=args.timeout)
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        print(sender, file=sys.stderr)
        return EXIT_OK
    except ChannelRefused as e:
        print(f"channel: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except TimeoutError as e:
        print(f"channel: {e}", file=sys.stderr)
        return EXIT_TIMEOUT
    except ChannelError as e:
        print(f"channel: {e}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        channel.close()


if __name__ == "__main__":
    sys.exit(main())
