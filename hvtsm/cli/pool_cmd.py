"""`hvtsm pool fill|status|drain`: the warm pool's guests, shared through the store by every
process that uses it."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from hvtsm.cli.exits import EXIT_OK
from hvtsm.cli.output import iso, table
from hvtsm.cli.run_cmd import add_libvirt_options, libvirt_options
from hvtsm.errors import InvokeError
from hvtsm.host import probe_host
from hvtsm.invoke.invoker import DEFAULT_TRUST
from hvtsm.pool import registry
from hvtsm.pool.rules import DEFAULT_MAX_USES, DEFAULT_POOL_MEMORY, PoolKey
from hvtsm.pool.warm import WarmPool
from hvtsm.store import Store
from hvtsm.units import format_size, parse_size
from hvtsm.zones.base import Backend
from hvtsm.zones.factory import driver_factory
from hvtsm.zones.logged import LoggedEvents


def add_parsers(commands: Any) -> None:
    pool = commands.add_parser("pool", help="the warm pool of pre-booted guests",
                               description="Pre-booted guests keyed by runtime and trust "
                               "level, which `hvtsm invoke` claims.")
    sub = pool.add_subparsers(dest="pool_command", metavar="ACTION")
    sub.required = True
    fill = sub.add_parser("fill", help="boot guests until COUNT are idle",
                          description="Boot guests (in parallel, two at a time) until COUNT "
                          "idle guests of the runtime and trust level exist.")
    _key_options(fill)
    fill.add_argument("--count", type=int, default=1, help="idle guests wanted (default 1)")
    fill.add_argument("--memory", default=format_size(DEFAULT_POOL_MEMORY),
                      help="memory of each guest (requests needing more boot cold; "
                      "default %(default)s)")
    fill.add_argument("--max-uses", type=int, default=DEFAULT_MAX_USES,
                      help="requests a guest serves before it is retired")
    fill.add_argument("--json", action="store_true", help="print JSON")
    add_libvirt_options(fill)
    fill.set_defaults(handler=cmd_fill)

    status = sub.add_parser("status", help="list the pool's guests")
    status.add_argument("--all", action="store_true", help="include retired guests")
    status.add_argument("--json", action="store_true", help="print JSON lines")
    status.set_defaults(handler=cmd_status)

    drain = sub.add_parser("drain", help="destroy idle guests",
                           description="Destroy the idle guests (of one key, or all) that no "
                           "other live process holds; busy ones finish their request.")
    drain.add_argument("--runtime")
    drain.add_argument("--trust")
    drain.add_argument("--json", action="store_true", help="print JSON")
    add_libvirt_options(drain)
    drain.set_defaults(handler=cmd_drain)


def _key_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runtime", default="python3", help="python3, sh or native")
    parser.add_argument("--trust", default=DEFAULT_TRUST, help="trust level")


def _pool(args: argparse.Namespace, store: Store, **kwargs: Any) -> WarmPool:
    events = LoggedEvents()
    driver = driver_factory(Backend.LIBVIRT, probe_host(), libvirt=libvirt_options(args))(
        events)
    # this process ends: its links must not keep the guests from the next one
    return WarmPool(store, driver, idle=events, hold_links=False,  # type: ignore[arg-type]
                    **kwargs)


def cmd_fill(args: argparse.Namespace) -> int:
    from hvtsm.invoke.plan import INTERPRETERS

    store = Store(args.db)
    key = PoolKey(args.runtime, args.trust)
    if key.runtime not in INTERPRETERS:
        raise InvokeError(f"unknown runtime {key.runtime!r}",
                          hint="use one of " + ", ".join(sorted(INTERPRETERS)))
    try:
        memory = parse_size(args.memory)
    except ValueError as exc:
        raise InvokeError(f"--memory: {exc}") from None
    if args.count < 0 or args.max_uses < 1:
        raise InvokeError("--count must be 0 or more and --max-uses 1 or more")
    pool = _pool(args, store, memory=memory, max_uses=args.max_uses)
    t0 = time.monotonic()
    try:
        booted = pool.fill(key, args.count)
    finally:
        pool.close()
        store.dispose()
    took = time.monotonic() - t0
    if args.json:
        print(json.dumps({"key": str(key), "booted": booted, "seconds": round(took, 1)}))
    else:
        print(f"pool {key}: booted {len(booted)} guest(s) in {took:.1f} s"
              + (f": {', '.join(booted)}" if booted else " (enough were idle)"))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    store = Store(args.db)
    rows = registry.guests(store, include_retired=args.all)
    store.dispose()
    if args.json:
        for g in rows:
            print(json.dumps({
                "guest": g.id, "runtime": g.runtime, "trust": g.trust, "state": g.state,
                "uses": g.uses, "memory": g.memory, "domain": g.domain,
                "booted": iso(g.booted_at), "zone": g.zone_id, "holder": g.holder,
                "holder_alive": registry.holder_alive(g.holder), "retired": iso(g.retired_at),
                "reason": g.tainted}))
        return EXIT_OK
    if not rows:
        print("the warm pool is empty" + ("" if args.all else " (--all shows retired guests)"))
        return EXIT_OK
    print(table(["GUEST", "RUNTIME", "TRUST", "STATE", "USES", "MEMORY", "BOOTED", "ZONE",
                 "REASON"],
                [[g.id, g.runtime, g.trust, g.state, g.uses, format_size(g.memory),
                  iso(g.booted_at), g.zone_id or "-", (g.tainted or "")[:50]] for g in rows]))
    return EXIT_OK


def cmd_drain(args: argparse.Namespace) -> int:
    store = Store(args.db)
    key = None
    if args.runtime or args.trust:
        key = PoolKey(args.runtime or "python3", args.trust or DEFAULT_TRUST)
    pool = _pool(args, store)
    try:
        drained = pool.drain(key)
    finally:
        pool.close()
        store.dispose()
    if args.json:
        print(json.dumps({"drained": drained}))
    else:
        print(f"drained {len(drained)} idle guest(s)" + (f": {', '.join(drained)}"
                                                        if drained else ""))
    return EXIT_OK
