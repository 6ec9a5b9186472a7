"""`hvtsm run` (the main job) and `hvtsm resume` (take over zones of a dead controller)."""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import subprocess
import threading
import time
from typing import IO, Any

from hvtsm.analysis import command_exec_globs
from hvtsm.cli.envopts import add_env_options, zone_env
from hvtsm.cli.exits import (
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    from_outcome,
)
from hvtsm.cli.live import LivePrinter, print_end
from hvtsm.cli.output import emit_json, say
from hvtsm.controllers import orphaned_zones
from hvtsm.host import probe_host
from hvtsm.lifecycle import Manager, ZoneRun
from hvtsm.policy import load_policy
from hvtsm.policy.catalog import default_policy_path
from hvtsm.policy.segments import choose
from hvtsm.store import Store
from hvtsm.zones.base import ZONE_USER, Backend, WorkloadIO
from hvtsm.zones.environment import EnvError
from hvtsm.zones.factory import AVAILABLE_BACKENDS, driver_factory, factories_for
from hvtsm.zones.identity import known_user


def add_parsers(commands: Any) -> None:
    run = commands.add_parser(
        "run", help="run a command in a new temporal zone",
        description="Run COMMAND in a new zone whose restrictions tighten as its policy says. "
        "Exits with the command's status when it ended on its own and nothing was found "
        "against it; 121 when an operator ended the zone, 122 when the agent's containment "
        "killed the command, 123 when the zone was found hostile (an anomaly was reacted "
        "to), 124 when the policy's lifespan ended it, 125 on an hvtsm error (or when hvtsm "
        "ended the zone to fail closed), 127 when the command is not found, 130 on Ctrl-C.")
    run.add_argument("--policy", metavar="FILE",
                     help="policy file (default: policies/default.toml of the installation)")
    run.add_argument("--backend", choices=[str(b) for b in AVAILABLE_BACKENDS], default="cgroup",
                     help="zone backend (default: cgroup)")
    run.add_argument("--user", default=ZONE_USER,
                     help="user the command runs as (default: zone, an identity of the zone's "
                     "own that no other zone and nothing on the host has; a user name runs it "
                     "as that user; 'root' only for trusted code)")
    run.add_argument("--role", help="segment role: the policy's [[segment]] selectors pick "
                     "the lifespan scale (and the policy, when the selector names one)")
    run.add_argument("--capability", action="append", default=[],
                     help="segment capability (repeatable), for the selectors as --role")
    run.add_argument("--net-pool", metavar="CIDR",
                     help="addresses for zone NICs (default 10.213.0.0/16 for cgroup zones, "
                     "10.214.0.0/16 for libvirt zones)")
    add_libvirt_options(run)
    add_env_options(run)
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
    from hvtsm.zones.libvirt.options import LibvirtOptions

    return LibvirtOptions(uri=args.libvirt_uri, template=args.template, accel=args.accel)


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
    if not known_user(args.user):
        say(f"hvtsm run: error: no such user: {args.user}")
        return EXIT_USAGE
    try:
        env = zone_env(args)
    except EnvError as exc:
        say(f"hvtsm run: error: {exc}")
        return EXIT_USAGE
    choice = choose(load_policy(args.policy or default_policy_path()),
                    [(args.role, frozenset(args.capability))])
    policy, scale = choice.policy, choice.scale
    # what the command's script runs is foreseen: only other programs get a transient zone
    expected = command_exec_globs(argv) if policy.transient.enabled else ()
    caps = probe_host()
    backend = Backend(args.backend)
    factory = driver_factory(backend, caps, net_pool=args.net_pool,
                             libvirt=libvirt_options(args) if backend is Backend.LIBVIRT
                             else None)
    store = Store(args.db)
    printer = LivePrinter(json_mode=args.json)
    manager = Manager(store, factory, listener=printer, actor=actor())
    io = WorkloadIO(stdout=subprocess.PIPE, stderr=subprocess.PIPE) if args.json else WorkloadIO()
    with Interrupts(manager) as interrupts:
        manager.start()
        try:
            run = manager.launch(policy, argv, io=io, user=args.user, scale=scale,
                                 expect_exec=expected, env=env.values)
            relays = _relay_output(run) if args.json else []
            interrupted = _wait(manager, run, interrupts)
            for relay in relays:
                relay.join(5)
            manager.settle(5)  # every anomaly's line before the exit line
        finally:
            manager.shutdown()
            store.dispose()
    print_end(run, time.time(), json_mode=args.json)
    if interrupted:
        return EXIT_INTERRUPTED
    return from_outcome(run.outcome)


def _wait(manager: Manager, run: ZoneRun, interrupts: Interrupts) -> bool:
    """Wait for the zone to end; Ctrl-C ends it cleanly. Returns True when interrupted."""
    interrupts.watch(run)
    run.ended.wait()
    return interrupts.raised.is_set()


def _relay_output(run: ZoneRun) -> list[threading.Thread]:
    """One thread per output stream, relaying it as `output` events (`_relay`)."""
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
    """Relay `pipe` line by line, each event holding at most MAX_OUTPUT_EVENT bytes: a
    longer line (a workload may write 500 MB without a newline) goes out as several events,
    all but its last marked "partial". Reads are bounded chunks, never a whole line, so
    the controller holds at most about two events' worth of a stream at any time."""
    from hvtsm.limits import MAX_OUTPUT_EVENT

    read = getattr(pipe, "read1", pipe.read)

    def emit(data: bytes, partial: bool) -> None:
        extra: dict[str, Any] = {"partial": True} if partial else {}
        emit_json("output", time.time(), zone=zone_id, stream=stream,
                  data=data.decode("utf-8", errors="replace"), **extra)

    pending = b""
    try:
        while chunk := read(MAX_OUTPUT_EVENT):
            data, at = pending + chunk, 0
            while True:
                newline = data.find(b"\n", at, at + MAX_OUTPUT_EVENT)
                if newline >= 0:
                    emit(data[at:newline + 1], partial=False)
                    at = newline + 1
                elif len(data) - at > MAX_OUTPUT_EVENT:  # more follows: not the line's end
                    cut = at + MAX_OUTPUT_EVENT
                    # never inside a UTF-8 character (at most 3 continuation bytes back)
                    while cut > at + MAX_OUTPUT_EVENT - 3 and data[cut] & 0xC0 == 0x80:
                        cut -= 1
                    emit(data[at:cut], partial=True)
                    at = cut
                else:
                    break
            pending = data[at:]
        if pending:  # the last line, without a newline
            emit(pending, partial=False)
    finally:
        pipe.close()


def cmd_resume(args: argparse.Namespace) -> int:
    caps = probe_host()
    store = Store(args.db)
    with store.session() as session:
        backends = [Backend(z.backend) for z in orphaned_zones(session)] or [Backend.CGROUP]
    factories = factories_for(backends, caps, libvirt=libvirt_options(args))
    printer = LivePrinter(json_mode=args.json)
    manager = Manager(store, factories, listener=printer, actor=actor())
    over: list[ZoneRun] = []
    with Interrupts(manager) as interrupts:
        try:
            # each adopted zone's line comes from the lifecycle (Adopted), before what its
            # adoption audits and before its first overdue phase
            adopted = manager.start(adopt=True)
            runs = [manager.zones[z] for z in adopted]
            # zones whose agent ended them while no controller ran: adopted and finished
            over = [r for r in manager.zones.all() if r.zone_id not in adopted]
            if not runs and not over:
                say("hvtsm: no orphaned zone to adopt")
            interrupted = False
            for run in runs:
                interrupted = _wait(manager, run, interrupts) or interrupted
        finally:
            manager.shutdown()
            store.dispose()
    for run in [*over, *runs]:
        print_end(run, time.time(), json_mode=args.json)
    return EXIT_INTERRUPTED if interrupted else EXIT_OK


class Interrupts:
    """Ctrl-C and SIGTERM end the zones being waited for, cleanly, from a thread of their
    own (a signal handler must not take the locks a launch holds: an exception landing
    mid-launch would leave a zone half-recorded)."""

    def __init__(self, manager: Manager | None = None) -> None:
        self.raised = threading.Event()
        self.manager = manager
        self._watched: list[ZoneRun] = []
        self._lock = threading.Lock()

    def __enter__(self) -> Interrupts:
        self.previous = {sig: signal.signal(sig, self._handle)
                         for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def watch(self, run: ZoneRun) -> None:
        """End `run` on an interrupt (at once when one came already)."""
        with self._lock:
            self._watched.append(run)
        if self.raised.is_set():
            self._end()

    def _handle(self, _signum: int, _frame: object) -> None:
        if self.raised.is_set():
            return
        self.raised.set()
        threading.Thread(target=self._end, name="interrupt", daemon=True).start()

    def _end(self) -> None:
        with self._lock:
            runs = list(self._watched)
        for run in runs:
            if self.manager is not None and not run.ended.is_set():
                say(f"hvtsm: interrupted: terminating zone {run.zone_id}")
                self.manager.terminate(run.zone_id, reason="interrupted (Ctrl-C or SIGTERM)",
                                       by="operator")


def actor() -> str:
    user = os.environ.get("SUDO_USER") or pwd.getpwuid(os.getuid()).pw_name
    return f"{user}@cli"
