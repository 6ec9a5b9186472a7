"""Typed per-zone driver state to and from the JSON the store keeps.

A backend's state is a dataclass; `dump` makes it JSON, `load` rebuilds it from what a
controller stored, maybe an older one: fields it lacks take their defaults, fields this
version no longer has are ignored, so adoption works across an upgrade.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def dump(state: Any) -> dict[str, Any]:
    assert dataclasses.is_dataclass(state) and not isinstance(state, type)
    return dataclasses.asdict(state)


def load(cls: type[T], data: Mapping[str, Any]) -> T:
    assert dataclasses.is_dataclass(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})
