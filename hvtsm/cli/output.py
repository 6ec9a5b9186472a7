"""Printing for the CLI: aligned tables, JSON lines, timestamps, one lock for all threads."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

_lock = threading.Lock()


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds")


def clock(ts: float) -> str:
    """Local wall-clock time with milliseconds, for live lines."""
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3]


def emit_json(event: str, ts: float, *, to: TextIO | None = None, **fields: Any) -> None:
    line = json.dumps({"event": event, "ts": iso(ts), **fields}, default=str)
    out = to or sys.stdout
    with _lock:
        out.write(line + "\n")
        out.flush()


def say(text: str, stream: TextIO | None = None) -> None:
    out = stream or sys.stderr
    with _lock:
        out.write(text + "\n")
        out.flush()


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    return "\n".join(lines)
