"""What `hvtsm cleanup` does with the warm pool: idle guests of a live pool stay (no
controller owns them, yet they are not orphans); guests whose domain is gone, and guests
whose process died while booting or serving them, are retired (their domain removed by
cleanup like any leftover)."""

from __future__ import annotations

from collections.abc import Callable

from hvtsm.pool import registry
from hvtsm.store import Store
from hvtsm.store.invoke_models import GuestState


def plan(store: Store, running: Callable[[str], bool]) -> tuple[set[str], dict[str, str]]:
    """(guest ids cleanup must leave alone, guest id -> why its row is retired).
    `running(guest_id)` tells whether the guest's domain runs."""
    keep: set[str] = set()
    retire: dict[str, str] = {}
    for guest in registry.guests(store):
        alive = running(guest.id)
        if not alive:
            retire[guest.id] = "its domain is gone (found by cleanup)"
        elif guest.state == GuestState.IDLE and (
                guest.holder is None or registry.holder_alive(guest.holder)):
            keep.add(guest.id)
        elif guest.state == GuestState.IDLE:
            # a dead holder's link is closed: the guest is as good as any idle one
            keep.add(guest.id)
        elif registry.holder_alive(guest.holder):
            keep.add(guest.id)  # booting or serving in a live process
        else:
            retire[guest.id] = (f"its process died while it was {guest.state} "
                                "(removed by cleanup)")
    return keep, retire


def apply(store: Store, retire: dict[str, str], removed: dict[str, list[str]]) -> None:
    for guest_id, reason in retire.items():
        registry.retire(store, guest_id, reason, removed=removed.get(guest_id))
