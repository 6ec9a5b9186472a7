"""The shape of a policy document, checked before any field is read: how deep it nests, how
long its arrays, tables, keys and strings are, and that every number is one a zone can use
(finite, within 64 bits). One iterative pass, linear in the document, so that what follows
(the fields' own checks, the monotonicity of the phases) works on bounded input.

Limits (hvtsm.limits): MAX_NESTING levels of tables and arrays, MAX_ITEMS entries per array
or table (fewer for the fields in FIELD_LIMITS), MAX_KEY characters per key, MAX_STRING
per string (MAX_GLOB_LENGTH per glob).
"""

from __future__ import annotations

import math
from typing import Any

from hvtsm.limits import (
    MAX_CHANNELS,
    MAX_EGRESS,
    MAX_GLOB_LENGTH,
    MAX_GLOBS,
    MAX_ITEMS,
    MAX_KEY,
    MAX_NESTING,
    MAX_PHASES,
    MAX_SEGMENTS,
    MAX_STRING,
)

Path = tuple[str | int, ...]

#: field -> (its most entries, what they are called)
FIELD_LIMITS: dict[str, tuple[int, str]] = {
    "phase": (MAX_PHASES, "[[phase]] tables"),
    "segment": (MAX_SEGMENTS, "[[segment]] tables"),
    "channel": (MAX_CHANNELS, "[[channel]] tables"),
    "egress": (MAX_EGRESS, "egress entries"),
    **dict.fromkeys(("sensitive_paths", "allow_exec", "deny_exec", "expect_exec"),
                    (MAX_GLOBS, "globs")),
    "deny_syscalls": (MAX_GLOBS, "syscall names"),
}
#: fields whose strings are globs, shorter than other strings
GLOB_FIELDS = frozenset({"sensitive_paths", "allow_exec", "deny_exec", "expect_exec"})
_INT_BOUND = 2**63


class ShapeError(ValueError):
    """What is wrong, and where: the keys and indices from the document's top."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.message = message
        self.path = path


def where(path: Path) -> tuple[int | None, str | None]:
    """(phase index, field) of `path` as PolicyError names them: ('phase', 2, 'egress', 7)
    is phase 2, field 'egress[7]'."""
    phase: int | None = None
    if len(path) >= 2 and path[0] == "phase" and isinstance(path[1], int):
        phase, path = path[1], path[2:]
    text = ""
    for step in path:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else step)
    return phase, text or None


def check_shape(doc: dict[str, Any]) -> None:
    """ShapeError for the first thing out of bounds."""
    stack: list[tuple[Any, Path, int]] = [(doc, (), 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_NESTING:
                raise ShapeError(f"tables and arrays nested more than {MAX_NESTING} levels "
                                 "deep", path)
            name = next((p for p in reversed(path) if isinstance(p, str)), "")
            most, noun = FIELD_LIMITS.get(name, (MAX_ITEMS, "entries")) \
                if isinstance(value, list) else (MAX_ITEMS, "keys")
            if len(value) > most:
                raise ShapeError(f"{len(value)} {noun}; at most {most}", path)
            if isinstance(value, dict):
                for key in value:
                    if len(key) > MAX_KEY:
                        raise ShapeError(f"a key of {len(key)} characters ({key[:40]!r}...); "
                                         f"at most {MAX_KEY}", path)
                children = [(v, (*path, k), depth + 1) for k, v in value.items()]
            else:
                children = [(v, (*path, i), depth + 1) for i, v in enumerate(value)]
            stack.extend(reversed(children))  # the document's order: the first error first
        elif isinstance(value, str):
            glob = len(path) >= 2 and path[-2] in GLOB_FIELDS
            most, noun = (MAX_GLOB_LENGTH, "glob") if glob else (MAX_STRING, "string")
            if len(value) > most:
                raise ShapeError(f"a {noun} of {len(value)} characters; at most {most}", path)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ShapeError(f"{value} is not a number a zone can use (no NaN or infinity "
                                 "anywhere in a policy)", path)
        elif isinstance(value, int) and not -_INT_BOUND <= value < _INT_BOUND:
            raise ShapeError("a whole number beyond 64 bits", path)
