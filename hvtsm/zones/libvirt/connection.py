"""One libvirt connection per controller, with its event loop, that survives libvirtd
restarts: a closed connection is reopened and the event callbacks registered again."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import libvirt

from hvtsm.errors import HostError

log = logging.getLogger(__name__)

#: (domain name, event, detail)
LifecycleListener = Callable[[str, int, int], None]
#: (domain name, device alias)
DeviceListener = Callable[[str, str], None]

_loop_lock = threading.Lock()
_loop_started = False


def _ensure_event_loop() -> None:
    """libvirt delivers events only while someone runs its default event loop."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


def _silence_libvirt_stderr() -> None:
    # libvirt prints every failed call to stderr by default; we raise typed errors instead
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


class Connection:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._lock = threading.RLock()
        self._conn: libvirt.virConnect | None = None
        self._callback_ids: list[int] = []
        self.lifecycle: dict[str, LifecycleListener] = {}
        self.device_removed: dict[str, DeviceListener] = {}
        self.reconnects = 0
        _silence_libvirt_stderr()
        _ensure_event_loop()

    def get(self) -> libvirt.virConnect:
        """The live connection, reopened if libvirtd went away meanwhile."""
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                self._conn = None
            self._conn = self._open()
            return self._conn

    def _open(self, attempts: int = 20, delay: float = 0.5) -> libvirt.virConnect:
        last: Exception | None = None
        for _ in range(attempts):
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                last = exc
                time.sleep(delay)
                continue
            conn.registerCloseCallback(self._closed, None)
            self._callback_ids = [
                conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                            self._on_lifecycle, None),
                conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
                                            self._on_device_removed, None),
            ]
            conn.setKeepAlive(5, 3)
            return conn
        raise HostError(f"cannot connect to libvirt at {self.uri}: {last}",
                        hint="start libvirtd (scripts/install-host.sh does) or pick another "
                        "--libvirt-uri")

    def _closed(self, _conn: Any, reason: int, _opaque: Any) -> None:
        log.warning("libvirt connection %s closed (reason %d); reconnecting", self.uri, reason)
        with self._lock:
            self._conn = None
            self.reconnects += 1
        # reopen in the background so events flow again without waiting for the next call
        threading.Thread(target=self._reopen_quietly, daemon=True).start()

    def _reopen_quietly(self) -> None:
        try:
            self.get()
        except HostError as exc:
            log.error("%s", exc)

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        listener = self.lifecycle.get(dom.name())
        if listener is not None:
            listener(dom.name(), event, detail)

    def _on_device_removed(self, _conn: Any, dom: Any, alias: str, _opaque: Any) -> None:
        listener = self.device_removed.get(dom.name())
        if listener is not None:
            listener(dom.name(), alias)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                for cid in self._callback_ids:
                    with contextlib.suppress(libvirt.libvirtError):
                        self._conn.domainEventDeregisterAny(cid)
                try:
                    self._conn.unregisterCloseCallback()
                    self._conn.close()
                except libvirt.libvirtError:
                    pass
                self._conn = None
