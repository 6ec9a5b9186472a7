"""The agent's end of the link to the host: a virtio-serial port (or any character device),
or a unix socket the agent connects to (tests on the host).

Both are used non-blocking by two threads (the reader and the writer) and share one model:
the link is *connected* or not, and each time it becomes connected its *generation* goes up,
so the writer knows to greet the host again with a fresh hello.

virtio-serial, as the guest kernel's virtio_console driver implements it: while no program
holds the host end (libvirt's unix socket has no client), poll() reports POLLHUP, read()
returns 0 and write() blocks (EAGAIN when non-blocking); when the host connects those stop.
POLLHUP is level-triggered, so a port without a host is re-polled every `idle` seconds
rather than waited on.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import glob
import logging
import os
import select
import socket
import termios
import threading
import time
import tty
from typing import Callable

from guest_agent.protocol import PORT_NAME

log = logging.getLogger("guest_agent")


class Disconnected(Exception):
    """The host end went away (or is not there)."""


class Stopped(Exception):
    """The agent is shutting down."""


class PortUnavailable(Exception):
    """The port never appeared, or the socket never accepted, within the bounded wait."""


def find_vport(name: str = PORT_NAME, sys_root: str = "/sys/class/virtio-ports",
               dev_root: str = "/dev") -> str | None:
    """/dev/vportNpM whose virtio port name is `name`, or None if not (yet) there."""
    for name_file in sorted(glob.glob(os.path.join(sys_root, "*", "name"))):
        try:
            with open(name_file) as f:
                found = f.read().strip()
        except OSError:
            continue
        if found == name:
            dev = os.path.join(dev_root, os.path.basename(os.path.dirname(name_file)))
            if os.path.exists(dev):
                return dev
    return None


class Port(abc.ABC):
    """What the reader and writer threads use; see the module docstring."""

    #: seconds between looks at a port whose host end is absent
    idle = 0.05

    def __init__(self, describe: str) -> None:
        self.describe = describe
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.generation = 0
        self.connected = False

    @abc.abstractmethod
    def open(self, wait: float) -> None:
        """Make the port usable (bounded by `wait` seconds) or raise PortUnavailable."""

    @abc.abstractmethod
    def wait_connected(self, stop: threading.Event) -> int:
        """Block until the host end is there; returns the connection generation."""

    def wait_generation(self, stop: threading.Event, timeout: float) -> int | None:
        """For the writer: the generation once connected (None after `timeout`)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not self.connected:
                left = deadline - time.monotonic()
                if stop.is_set() or left <= 0:
                    return None
                self._changed.wait(min(left, 0.2))
            return self.generation

    @abc.abstractmethod
    def read(self, generation: int, timeout: float) -> bytes:
        """Bytes from the host (b"" if none within `timeout`); Disconnected at end."""

    @abc.abstractmethod
    def write(self, data: bytes, generation: int, stop: threading.Event) -> None:
        """All of `data` to the host of this generation, or Disconnected."""

    def _write_fd(self, fd_of: Callable[[], int | None],
                  send: Callable[[memoryview], int], data: bytes, generation: int,
                  stop: threading.Event) -> None:
        """Write all of `data` through non-blocking `send`, waiting for POLLOUT in between;
        each send happens under the port lock after checking the generation, so a message of
        a lost connection never goes to its successor."""
        view = memoryview(data)
        while view:
            if stop.is_set():
                raise Stopped()
            with self._lock:
                if not self.connected or self.generation != generation:
                    raise Disconnected()
                try:
                    n = send(view)
                except (BlockingIOError, InterruptedError):
                    n = 0
                except OSError as e:
                    raise Disconnected() from e
            if n:
                view = view[n:]
                continue
            fd = fd_of()
            if fd is None or fd < 0:
                raise Disconnected()
            try:
                poller = select.poll()
                poller.register(fd, select.POLLOUT)
                events = poller.poll(500)
            except (OSError, ValueError) as e:
                raise Disconnected() from e
            if events and events[0][1] & (select.POLLHUP | select.POLLERR | select.POLLNVAL) \
                    and not events[0][1] & select.POLLOUT:
                raise Disconnected()

    def _set_connected(self) -> int:
        with self._changed:
            self.generation += 1
            self.connected = True
            self._changed.notify_all()
            return self.generation

    def lost(self, generation: int) -> None:
        """Mark the link of `generation` as gone (no-op if a newer one is up)."""
        with self._changed:
            if self.generation == generation and self.connected:
                self.connected = False
                self._drop()
                self._changed.notify_all()
                log.info("host disconnected from %s", self.describe)

    def _drop(self) -> None:  # noqa: B027  (a hook: ports holding nothing keep it empty)
        """Release what a lost connection held (called with the lock held)."""

    def close(self) -> None:  # noqa: B027  (a hook: ports holding nothing keep it empty)
        """Release everything."""


class DevicePort(Port):
    """A character device: a virtio-serial port found by name, or one given by path."""

    def __init__(self, path: str | None = None, name: str = PORT_NAME,
                 sys_root: str = "/sys/class/virtio-ports", dev_root: str = "/dev") -> None:
        super().__init__(path or f"virtio port {name}")
        self.path = path
        self.name = name
        self.sys_root = sys_root
        self.dev_root = dev_root
        self.fd = -1

    def open(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        delay = 0.02
        while True:
            path = self.path or find_vport(self.name, self.sys_root, self.dev_root)
            if path is not None:
                try:
                    self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC
                                      | os.O_NOCTTY)
                    break
                except OSError as e:
                    problem = f"cannot open {path}: {e}"
            else:
                problem = f"no virtio port named {self.name} under {self.sys_root}"
            if time.monotonic() >= deadline:
                raise PortUnavailable(problem)
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        self.describe = path
        if os.isatty(self.fd):
            # a serial line or console: no echo, no line editing, no CR/LF translation
            tty.setraw(self.fd, termios.TCSANOW)
        log.info("opened %s", path)

    def _hup(self) -> bool:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLOUT)
        events = poller.poll(0)
        return bool(events and events[0][1] & (select.POLLHUP | select.POLLERR))

    def wait_connected(self, stop: threading.Event) -> int:
        announced = False
        with self._changed:
            if self.connected:
                return self.generation
        if self.generation:
            stop.wait(self.idle)  # a device that reads 0 without HUP must not spin
        while not stop.is_set():
            if not self._hup():
                log.info("host connected to %s", self.describe)
                return self._set_connected()
            if not announced:
                log.info("waiting for the host to open %s", self.describe)
                announced = True
            stop.wait(self.idle)
        raise Stopped()

    def read(self, generation: int, timeout: float) -> bytes:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        events = poller.poll(int(timeout * 1000))
        if not events:
            return b""
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            data = None
        except OSError as e:
            if e.errno != errno.EIO:  # EIO: a tty whose other side hung up
                log.warning("reading %s: %s", self.describe, e)
            self.lost(generation)
            raise Disconnected() from e
        if data:
            return data
        if data is None and not events[0][1] & (select.POLLHUP | select.POLLERR):
            return b""
        self.lost(generation)  # read 0 or HUP: the host end is gone
        raise Disconnected()

    def write(self, data: bytes, generation: int, stop: threading.Event) -> None:
        try:
            self._write_fd(lambda: self.fd, lambda v: os.write(self.fd, v), data,
                      generation, stop)
        except Disconnected:
            if self._hup():
                self.lost(generation)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class UnixPort(Port):
    """A unix stream socket the agent connects to; reconnects (bounded) when it closes."""

    def __init__(self, path: str, wait: float = 30.0) -> None:
        super().__init__("unix:" + path)
        self.path = path
        self.wait = wait
        self.sock: socket.socket | None = None

    def open(self, wait: float) -> None:
        self.wait = wait  # the first connect happens in wait_connected

    def _connect(self, stop: threading.Event) -> socket.socket:
        deadline = time.monotonic() + self.wait
        delay = 0.01
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(self.path)
                sock.setblocking(False)
                return sock
            except OSError as e:
                sock.close()
                if stop.is_set():
                    raise Stopped() from e
                if time.monotonic() >= deadline:
                    raise PortUnavailable(f"cannot connect to {self.path}: {e}") \
                        from e
            stop.wait(delay)
            delay = min(delay * 2, 0.5)

    def wait_connected(self, stop: threading.Event) -> int:
        with self._changed:
            if self.connected:
                return self.generation
        sock = self._connect(stop)
        with self._changed:
            self.sock = sock
        log.info("connected to %s", self.describe)
        return self._set_connected()

    def _fd(self) -> int | None:
        sock = self.sock
        return sock.fileno() if sock is not None else None

    def read(self, generation: int, timeout: float) -> bytes:
        sock = self.sock
        if sock is None or self.generation != generation:
            raise Disconnected()
        try:
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            if not poller.poll(int(timeout * 1000)):
                return b""
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return b""
        except (OSError, ValueError) as e:
            self.lost(generation)
            raise Disconnected() from e
        if not data:
            self.lost(generation)
            raise Disconnected()
        return data

    def write(self, data: bytes, generation: int, stop: threading.Event) -> None:
        def send(view: memoryview) -> int:
            sock = self.sock
            if sock is None:
                raise Disconnected()
            return sock.send(view)

        try:
            self._write_fd(self._fd, send, data, generation, stop)
        except Disconnected:
            self.lost(generation)
            raise

    def _drop(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None

    def close(self) -> None:
        with self._lock:
            self.connected = False
            self._drop()


def make_port(port: str | None, connect: str | None, name: str) -> Port:
    if connect is not None:
        if not connect.startswith("unix:"):
            raise ValueError("--connect takes unix:PATH")
        return UnixPort(connect[len("unix:"):])
    return DevicePort(port, name)


__all__: list[str] = ["DevicePort", "Disconnected", "Port", "PortUnavailable", "Stopped",
                      "UnixPort", "find_vport", "make_port"]
