"""Standbys of pooled guests (guest_agent/standby.py): which runtime gets which kind, and
what a zone's audit trail says about the standby its start used or passed over."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

#: runtime (the pool's key) -> (standby mode, the program its requests run; None: the
#: guest's python itself). A runtime not listed (native code) gets no standby.
MODES: dict[str, tuple[str, str | None]] = {"python3": ("python", None),
                                            "sh": ("exec", "/bin/sh")}


def standby_id(guest: str) -> str:
    """One standby per guest at a time, named by the guest, so any process that claims
    the guest can name it (the agent checks that it fits the request)."""
    return "sb-" + guest


def start_note(note: Mapping[str, Any] | None) -> str | None:
    """The audit's words for the agent's `started.standby` (None: no standby was named)."""
    if not isinstance(note, Mapping):
        return None
    pid = note.get("pid")
    if note.get("used") is True:
        prepared = note.get("prepared")
        when = (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(prepared))
                + f".{int(prepared * 1000) % 1000:03d}Z"
                if isinstance(prepared, (int, float)) and 0 < prepared < 2**33 else "?")
        return f"started from a standby prepared at {when} (pid {_short(pid)})"
    return f"standby not used ({_short(note.get('reason'), 300)}): a normal start"


def _short(value: Any, limit: int = 40) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "..."
