"""Typed per-zone driver state to and from the JSON the store keeps.

A backend's state is a dataclass; `dump` makes it JSON, `load` rebuilds it from what a
controller stored, maybe an older one: fields it lacks take their defaults, fields this
version no longer has are ignored, so adoption works across an upgrade.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hvtsm.zones.base import StartFacts

T = TypeVar("T")


def dump(state: Any) -> dict[str, Any]:
    assert dataclasses.is_dataclass(state) and not isinstance(state, type)
    return dataclasses.asdict(state)


def load(cls: type[T], data: Mapping[str, Any]) -> T:
    assert dataclasses.is_dataclass(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(kw_only=True)
class TransientState:
    """What every backend keeps about a transient zone beside its own fields: the process
    it was split off for, whose it is, and what was worth telling when it was placed."""

    parent: str
    pid: int
    user: str | None = None
    frozen: bool = False
    notes: list[str] = field(default_factory=list)
    transient: bool = True
    version: int = 1

    def to_json(self) -> dict[str, Any]:
        return dump(self)

    def facts(self) -> StartFacts:
        return StartFacts(notes=tuple(self.notes))
