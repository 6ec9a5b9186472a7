"""`hvtsm run` (the main job) and `hvtsm resume` (take over zones of a dead controller)."""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import subprocess
import threading
from typing import IO, Any

from hvtsm.cli.exits import (
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    from_status,
)
from hvtsm.cli.output import clock, emit_json, say
from hvtsm.controllers import orphaned_zones
from hvtsm.host import probe_host
from hvtsm.manager import Manager, Notice, ZoneRun
from hvtsm.policy import load_policy
from hvtsm.policy.catalog import default_policy_path, load_referenced
from hvtsm.store import Store
from hvtsm.store.audit import evidence_text
from hvtsm.store.models import ZoneState
from hvtsm.units import format_duration_ms
from hvtsm.zones.base import Backend, WorkloadIO
from hvtsm.zones.factory import AVAILABLE_BACKENDS, drivers_for, make_driver


def add_parsers(commands: Any) -> None:
    run = commands.add_parser(
        "run", help="run a command in a new temporal zone",
        description="Run COMMAND in a new zone whose restrictions tighten as its policy says. "
        "Exits with the command's status, 124 when the zone was terminated by policy, 125 on "
        "an hvtsm error, 127 when the command is not found, 130 on Ctrl-C.")
    run.add_argument("--policy", metavar="FILE",
                     help="policy file (default: policies/default.toml of the installation)")
    run.add_argument("--backend", choices=[str(b) for b in AVAILABLE_BACKENDS], default="cgroup",
                     help="zone backend (default: cgroup)")
    run.add_argument("--user", default="nobody",
                     help="user the command runs as (default: nobody; 'root' only for trusted "
                     "code)")
    run.add_argument("--role", help="segment role: the policy's [[segment]] selectors pick "
                     "the lifespan scale (and the policy, when the selector names one)")
    run.add_argument("--capability", action="append", default=[],
                     help="segment capability (repeatable), for the selectors as --role")
    run.add_argument("--net-pool", metavar="CIDR",
                     help="addresses for zone NICs (default 10.213.0.0/16 for cgroup zones, "
                     "10.214.0.0/16 for libvirt zones)")
    add_libvirt_options(run)
    run.add_argument("--json", action="store_true",
                     help="print JSON lines (phase, anomaly, reaction, output, exit) on stdout")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS]")
    run.set_defaults(handler=cmd_run)

    resume = commands.add_parser(
        "resume", help="take over the zones of a controller that died",
        description="Adopt every live zone whose controller is gone, apply at once each "
        "tightening that fell due meanwhile (audited as late), and follow them to their end.")
    resume.add_argument("--json", action="store_true", help="print JSON lines")
    add_libvirt_options(resume)
    resume.set_defaults(handler=cmd_resume)


def add_libvirt_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("libvirt zones")
    group.add_argument("--libvirt-uri", default="qemu:///system",
                       help="libvirt connection (default qemu:///system)")
    group.add_argument("--template", default="lab",
                       help="domain template in domain_templates/ (default lab)")
    group.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto",
                       help="accelerator: KVM when it really runs a guest here, else TCG "
                       "(default auto)")


def libvirt_options(args: argparse.Namespace) -> Any:
    from hvtsm.zones.libvirt.driver import LibvirtOptions

    return LibvirtOptions(uri=args.libvirt_uri, template=args.template, accel=args.accel)


class LivePrinter:
    """Turns manager notices into live lines (stderr) or JSON lines (stdout)."""

    def __init__(self, *, json_mode: bool) -> None:
        self.json_mode = json_mode
        self.started: dict[str, float] = {}

    def __call__(self, notice: Notice) -> None:
        if notice.kind == "exit":
            return  # printed by the main thread once the output is drained
        if notice.kind == "start":
            self.started[notice.zone_id] = notice.ts
        if self.json_mode:
            emit_json(notice.kind, notice.ts, zone=notice.zone_id, **notice.data)
            return
        since = notice.ts - self.started.get(notice.zone_id, notice.ts)
        prefix = f"hvtsm {clock(notice.ts)} +{since:.3f}s {notice.zone_id}"
        data = notice.data
        if notice.kind == "start":
            life = "no lifespan limit" if data["lifespan_ms"] is None else (
                f"lifespan {format_duration_ms(data['lifespan_ms'])}")
            extra = "".join(f", {k} {data[k]}" for k in ("accel", "boot_ms") if k in data)
            say(f"hvtsm {clock(notice.ts)} zone {notice.zone_id} started: backend "
                f"{data['backend']}{extra}, policy {data['policy']} ({life}), "
                f"pid {data['pid']}")
        elif notice.kind == "phase":
            changes = ", ".join(f"{k} {v}" for k, v in data["changes"].items()) or "no change"
            late = "  LATE" if data["late"] else ""
            say(f"{prefix} phase {data['phase']} (at {format_duration_ms(data['at_ms'])}): "
                f"{changes}  [lag {data['lag_ms']:.1f} ms]{late}")
        elif notice.kind == "note":
            say(f"{prefix} {data['kind']}: {data['detail']}")
        elif notice.kind == "anomaly":
            said = evidence_text(data.get("evidence") or {})
            say(f"{prefix} ANOMALY {data['kind']}: {data['detail']}"
                + (f" [{said}]" if said else ""))
        elif notice.kind == "reaction":
            say(f"{prefix} REACTION {data['action']}: {data['reason']}")
        else:
            say(f"{prefix} {notice.kind} {data}")


def cmd_run(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        say("hvtsm run: error: no command given; usage: hvtsm run [OPTIONS] -- COMMAND [ARGS]")
        return EXIT_USAGE
    # checked before anything is made, so a typo leaves no zone and no row behind
    if shutil.which(argv[0]) is None:
        say(f"hvtsm run: error: command not found: {argv[0]}")
        return EXIT_NOT_FOUND
    try:
        pwd.getpwnam(args.user)
    except KeyError:
        say(f"hvtsm run: error: no such user: {args.user}")
        return EXIT_USAGE
    policy = load_policy(args.policy or default_policy_path())
    scale = 1.0
    selector = policy.selector_for(args.role, frozenset(args.capability))
    if selector is not None:
        scale = selector.lifespan_scale
        if selector.policy is not None:
            index = policy.segments.index(selector)
            policy = load_referenced(selector.policy, beside=policy.source,
                                     field=f"segment[{index}].policy")
    caps = probe_host()
    backend = Backend(args.backend)
    driver = make_driver(backend, caps, net_pool=args.net_pool,
                         libvirt=libvirt_options(args) if backend is Backend.LIBVIRT else None)
    store = Store(args.db)
    printer = LivePrinter(json_mode=args.json)
    manager = Manager(store, driver, listener=printer, actor=_actor())
    io = WorkloadIO(stdout=subprocess.PIPE, stderr=subprocess.PIPE) if args.json else WorkloadIO()
    with _Interrupts() as interrupts:
        manager.start()
        try:
            run = manager.launch(policy, argv, io=io, user=args.user, scale=scale)
            relays = _relay_output(run) if args.json else []
            interrupted = _wait(manager, run, interrupts)
            for relay in relays:
                relay.join(5)
            manager.settle(5)  # every anomaly's line before the exit line
        finally:
            manager.shutdown()
            store.dispose()
    _print_exit(run, json_mode=args.json)
    if interrupted:
        return EXIT_INTERRUPTED
    if run.state is ZoneState.TERMINATED:
        return EXIT_TERMINATED
    return from_status(run.exit_status)


def _wait(manager: Manager, run: ZoneRun, interrupts: _Interrupts) -> bool:
    """Wait for the zone to end; Ctrl-C ends it cleanly. Returns True when interrupted."""
    while not run.ended.wait(0.1):
        if interrupts.raised.is_set():
            say(f"hvtsm: interrupted: terminating zone {run.zone_id}")
            manager.terminate(run.zone_id, reason="interrupted (Ctrl-C or SIGTERM)",
                              by="operator")
            run.ended.wait(15)
            return True
    return interrupts.raised.is_set()


def _relay_output(run: ZoneRun) -> list[threading.Thread]:
    assert run.workload is not None
    threads = []
    for name, pipe in (("stdout", run.workload.stdout), ("stderr", run.workload.stderr)):
        if pipe is None:
            continue
        t = threading.Thread(target=_relay, args=(run.zone_id, name, pipe), daemon=True)
        t.start()
        threads.append(t)
    return threads


def _relay(zone_id: str, stream: str, pipe: IO[bytes]) -> None:
    import time

    for line in iter(pipe.readline, b""):
        emit_json("output", time.time(), zone=zone_id, stream=stream,
                  data=line.decode("utf-8", errors="replace"))
    pipe.close()


def _print_exit(run: ZoneRun, *, json_mode: bool) -> None:
    import time

    now = time.time()
    if json_mode:
        emit_json("exit", now, zone=run.zone_id, status=run.exit_status, state=str(run.state),
                  reason=run.end_reason)
    else:
        say(f"hvtsm {clock(now)} zone {run.zone_id} {run.state}: {run.end_reason}; "
            f"exit status {run.exit_status}")


def cmd_resume(args: argparse.Namespace) -> int:
    caps = probe_host()
    store = Store(args.db)
    with store.session() as session:
        backends = [Backend(z.backend) for z in orphaned_zones(session)] or [Backend.CGROUP]
    drivers = drivers_for(backends, caps, libvirt=libvirt_options(args))
    printer = LivePrinter(json_mode=args.json)
    manager = Manager(store, drivers, listener=printer, actor=_actor())
    with _Interrupts() as interrupts:
        try:
            adopted = manager.start(adopt=True)
            runs = [manager.zones[z] for z in adopted]
            for run in runs:
                printer.started[run.zone_id] = run.started_at
                if args.json:
                    emit_json("adopt", run.started_at, zone=run.zone_id,
                              pending=sorted(run.pending))
                else:
                    say(f"hvtsm: adopted zone {run.zone_id} ({len(run.pending)} transition(s) "
                        "pending)")
            if not runs:
                say("hvtsm: no orphaned zone to adopt")
            interrupted = False
            for run in runs:
                interrupted = _wait(manager, run, interrupts) or interrupted
        finally:
            manager.shutdown()
            store.dispose()
    for run in runs:
        _print_exit(run, json_mode=args.json)
    return EXIT_INTERRUPTED if interrupted else EXIT_OK


class _Interrupts:
    """Ctrl-C and SIGTERM only raise a flag; the wait loop then ends the zone cleanly.
    An exception could land mid-launch and leave a zone half-recorded."""

    def __init__(self) -> None:
        self.raised = threading.Event()

    def __enter__(self) -> _Interrupts:
        self.previous = {sig: signal.signal(sig, self._handle)
                         for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, _signum: int, _frame: object) -> None:
        self.raised.set()


def _actor() -> str:
    user = os.environ.get("SUDO_USER") or pwd.getpwuid(os.getuid()).pw_name
    return f"{user}@cli"
