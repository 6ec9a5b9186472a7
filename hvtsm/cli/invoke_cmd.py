"""`hvtsm invoke`: run program code (a file, or stored code by id) in a zone, from the warm
pool when one of its guests fits, and print its output and result. The work is done by
`hvtsm.invoke.Invoker`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hvtsm.cli.envopts import add_env_options, zone_env
from hvtsm.cli.exits import EXIT_USAGE, from_outcome
from hvtsm.cli.output import say
from hvtsm.cli.run_cmd import add_libvirt_options, libvirt_options
from hvtsm.errors import InvokeError
from hvtsm.files import FileRefused, read_regular
from hvtsm.host import probe_host
from hvtsm.invoke import Invoker, InvokeRequest
from hvtsm.invoke.invoker import DEFAULT_TRUST, InvokeResult
from hvtsm.lifecycle import Manager
from hvtsm.limits import MAX_CODE_BYTES
from hvtsm.pool.warm import WarmPool
from hvtsm.store import Store
from hvtsm.units import parse_duration_ms
from hvtsm.zones.base import ZONE_USER, Backend
from hvtsm.zones.environment import EnvError
from hvtsm.zones.factory import driver_factory


def add_parsers(commands: Any) -> None:
    invoke = commands.add_parser(
        "invoke", help="run program code on request (warm pool or a new guest)",
        description="Store and analyze program code, run it in a zone (a warm guest of its "
        "runtime and trust level when the pool has one, else a new one) and print its "
        "output and result. Exits with the program's status, 124 when the zone was ended "
        "(timeout, policy, reaction), 125 on an hvtsm error.")
    what = invoke.add_mutually_exclusive_group(required=True)
    what.add_argument("path", nargs="?", metavar="PATH", help="program code to store and run")
    what.add_argument("--code-id", metavar="ID", help="run stored code (sha256 or a prefix)")
    invoke.add_argument("--arg", action="append", default=[], metavar="A",
                        help="argument for the program (repeatable)")
    invoke.add_argument("--timeout", default="30s",
                        help="end the zone after this long (default 30s)")
    invoke.add_argument("--policy", help="policy name or file (default: the default policy)")
    invoke.add_argument("--trust", default=DEFAULT_TRUST,
                        help=f"trust level: guests serve only their own (default {DEFAULT_TRUST})")
    invoke.add_argument("--runtime", help="python3, sh or native (default: from the analysis)")
    invoke.add_argument("--user", default=ZONE_USER,
                        help="user the code runs as (default: zone, an identity of the "
                        "zone's own; not root)")
    invoke.add_argument("--backend", choices=["libvirt", "cgroup"], default="libvirt",
                        help="libvirt (default; warm pool) or cgroup (a cold cgroup zone)")
    invoke.add_argument("--cold", action="store_true", help="do not use the warm pool")
    invoke.add_argument("--store-only", action="store_true",
                        help="only store and analyze the code; print its id")
    add_env_options(invoke)
    invoke.add_argument("--json", action="store_true", help="print one JSON object")
    add_libvirt_options(invoke)
    invoke.set_defaults(handler=cmd_invoke)


def cmd_invoke(args: argparse.Namespace) -> int:
    try:
        timeout = parse_duration_ms(args.timeout) / 1000
    except ValueError as exc:
        say(f"hvtsm invoke: error: --timeout: {exc}")
        return EXIT_USAGE
    if timeout <= 0:
        say("hvtsm invoke: error: --timeout must be above 0")
        return EXIT_USAGE
    try:
        env = zone_env(args)
    except EnvError as exc:
        say(f"hvtsm invoke: error: {exc}")
        return EXIT_USAGE
    code = name = None
    if args.path is not None:
        try:
            code = read_regular(args.path, MAX_CODE_BYTES, what="a program file")
        except FileRefused as exc:
            raise InvokeError(f"{args.path}: {exc}") from None
        except OSError as exc:
            raise InvokeError(f"cannot read {args.path}: {exc.strerror or exc}") from None
        name = args.path  # stored under its base name; errors name it as given
    store = Store(args.db)
    if args.store_only:
        if code is None:
            say("hvtsm invoke: error: --store-only needs a PATH")
            return EXIT_USAGE
        from hvtsm.invoke.code import put_code

        row, report = put_code(store, code, name)
        if args.json:
            print(json.dumps({"code_id": row.id, "name": row.name, "language": row.language,
                              "size": row.size, "analysis": report.to_dict()}))
        else:
            print(row.id)
        return 0
    backend = Backend(args.backend)
    factory = driver_factory(backend, probe_host(), libvirt=libvirt_options(args)
                             if backend is Backend.LIBVIRT else None)
    manager = Manager(store, factory, actor="invoke@cli")
    pool = WarmPool(store, manager.driver, idle=manager.events,  # type: ignore[arg-type]
                    hold_links=False) if backend is Backend.LIBVIRT else None
    manager.start()
    try:
        result = Invoker(manager, pool=pool).invoke(InvokeRequest(
            code=code, name=name, code_id=args.code_id, args=tuple(args.arg), timeout=timeout,
            policy=args.policy, trust=args.trust, runtime=args.runtime, user=args.user,
            backend=backend, warm=not args.cold, env=env.values))
    finally:
        if pool is not None:
            pool.close()
        manager.shutdown()
        store.dispose()
    _print(result, json_mode=args.json)
    return from_outcome(result.outcome)


def _print(result: InvokeResult, *, json_mode: bool) -> None:
    if json_mode:
        print(json.dumps(result.to_json()))
        return
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr)
    for a in result.anomalies:
        say(f"hvtsm invoke: ANOMALY {a['kind']}: {a['detail']}")
    where = f"guest {result.guest_id} warm" if result.warm else f"{result.backend} cold"
    fate = ""
    if result.warm:
        fate = "; guest back in the pool" if result.guest_retired is None else \
            f"; guest retired: {result.guest_retired}"
    said = result.outcome.describe() if result.outcome is not None else \
        f"exit status {result.exit_status}"
    say(f"hvtsm invoke: zone {result.zone_id} (audit id) {result.state}, {where}, "
        f"{result.latency_ms:.0f} ms, {said}"
        + (" (timeout)" if result.timed_out else "") + fate
        + f"; code {result.code_id[:12]}")
