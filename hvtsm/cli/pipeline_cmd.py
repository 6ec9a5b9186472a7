"""`hvtsm pipeline`: split a program into segments and run each group in a zone of its own."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from hvtsm.cli.exits import (
    EXIT_INTERRUPTED,
    EXIT_INVALID,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    from_status,
)
from hvtsm.cli.live import LivePrinter
from hvtsm.cli.output import emit_json, say, table
from hvtsm.cli.run_cmd import Interrupts, actor, add_libvirt_options, libvirt_options
from hvtsm.errors import AnalysisError, PipelineError, PolicyError
from hvtsm.host import probe_host
from hvtsm.lifecycle import Manager
from hvtsm.limits import MAX_OUTPUT
from hvtsm.pipeline.plan import Plan, plan_manifest, plan_python
from hvtsm.pipeline.runner import PipelineResult, run_pipeline
from hvtsm.policy.catalog import load_referenced
from hvtsm.store import Store
from hvtsm.store.models import ZoneState
from hvtsm.units import format_duration_ms, format_size
from hvtsm.zones.base import ZONE_USER, Backend
from hvtsm.zones.factory import AVAILABLE_BACKENDS, driver_factory
from hvtsm.zones.identity import known_user


def add_parsers(commands: Any) -> None:
    parser = commands.add_parser(
        "pipeline", help="split a program into segments, each in its own zone",
        description="Analyze PROGRAM, group the steps of its entry function by what they do "
        "(network -> fetch, input parsing -> parse, file writes -> store, else compute), give "
        "each group the policy the pipeline policy's [[segment]] selectors pick, and run the "
        "groups one after the other, each in its own zone, passing each result to the next "
        "over a channel the policy grants. Or name the segments in a --manifest. Exit 0 when "
        "every stage exited 0; otherwise the failing stage's status (124: it was ended); 1 "
        "when the program cannot be split or the policy does not allow it.")
    parser.add_argument("program", nargs="?", metavar="PROGRAM",
                        help="a Python program whose entry function chains its steps")
    parser.add_argument("--manifest", metavar="FILE",
                        help="a TOML manifest naming the segments (instead of PROGRAM)")
    parser.add_argument("--entry", default="main",
                        help="the entry function (default main)")
    parser.add_argument("--policy", default="pipeline",
                        help="pipeline policy: a name in the policy directory or a path "
                        "(default pipeline)")
    parser.add_argument("--plan", action="store_true",
                        help="print the plan (stages, policies, lifespans, channels) and stop")
    parser.add_argument("--backend", choices=[str(b) for b in AVAILABLE_BACKENDS],
                        default="cgroup", help="zone backend (default: cgroup)")
    parser.add_argument("--user", default=ZONE_USER,
                        help="user the stages run as (default: zone, an identity of each "
                        "zone's own)")
    parser.add_argument("--input-timeout", type=float, default=60.0, metavar="S",
                        help="how long a stage waits for its input (default 60)")
    add_libvirt_options(parser)
    parser.add_argument("--json", action="store_true",
                        help="JSON lines on stdout; the last one is the pipeline's result")
    parser.add_argument("args", nargs=argparse.REMAINDER, metavar="-- ARGS",
                        help="the entry function's arguments")
    parser.set_defaults(handler=cmd_pipeline)


def make_plan(args: argparse.Namespace) -> Plan:
    policy = load_referenced(args.policy, beside=None, field="--policy")
    if args.manifest:
        return plan_manifest(args.manifest, policy)
    return plan_python(args.program, policy, entry=args.entry)


def cmd_pipeline(args: argparse.Namespace) -> int:
    values = list(args.args)
    if values[:1] == ["--"]:
        values = values[1:]
    if bool(args.program) == bool(args.manifest):
        say("hvtsm pipeline: error: give a PROGRAM or --manifest FILE (one of them)")
        return EXIT_USAGE
    if not known_user(args.user):
        say(f"hvtsm pipeline: error: no such user: {args.user}")
        return EXIT_USAGE
    try:
        plan = make_plan(args)
    except (AnalysisError, PolicyError, PipelineError) as exc:
        # a program or policy that does not allow the split is an answer, like an invalid
        # policy: exit 1, and nothing was made
        say(f"hvtsm: error: {exc}")
        if exc.hint:
            say(f"hvtsm: hint: {exc.hint}")
        return EXIT_INVALID
    if args.plan:
        _print_plan(plan, json_mode=args.json)
        return EXIT_OK
    backend = Backend(args.backend)
    factory = driver_factory(backend, probe_host(), libvirt=libvirt_options(args)
                             if backend is Backend.LIBVIRT else None)
    store = Store(args.db)
    printer = LivePrinter(json_mode=args.json)
    manager = Manager(store, factory, listener=printer, actor=actor())
    with Interrupts(manager) as interrupts:
        manager.start()
        try:
            def on_stage(stage: Any, run: Any) -> None:
                interrupts.watch(run)

            result = run_pipeline(manager, plan, values, user=args.user, backend=backend,
                                  input_timeout=args.input_timeout, on_stage=on_stage)
            manager.settle(5)
        finally:
            manager.shutdown()
            store.dispose()
    _print_result(result, json_mode=args.json)
    if interrupts.raised.is_set():
        return EXIT_INTERRUPTED
    failed = result.failed
    if failed is None:
        return EXIT_OK
    if failed.state == str(ZoneState.TERMINATED):
        return EXIT_TERMINATED
    return from_status(failed.exit_status) or EXIT_INVALID


def _print_plan(plan: Plan, *, json_mode: bool) -> None:
    if json_mode:
        print(plan.to_json())
        return
    print(f"pipeline {plan.name} (policy {plan.policy.name}: {plan.policy.source})")
    print(table(["STAGE", "ROLE", "RUNS", "CAPABILITIES", "POLICY", "LIFESPAN", "CHOSEN BY"], [
        [s.name, s.role, ",".join(s.functions) or " ".join(s.command),
         ", ".join(sorted(s.capabilities)) or "-", s.policy.name,
         "-" if s.lifespan_ms is None else format_duration_ms(s.lifespan_ms), s.chosen_by]
        for s in plan.stages]))
    for index in range(len(plan.stages) - 1):
        a, b = plan.stages[index].name, plan.stages[index + 1].name
        grant = plan.policy.grant_for(a, b)
        assert grant is not None  # checked when the plan was made
        print(f"channel {a} -> {b}: max message {grant.max_message} B, max rate "
              f"{grant.max_rate:g}/s")


def _print_result(result: PipelineResult, *, json_mode: bool) -> None:
    if json_mode:
        emit_json("pipeline", time.time(), **result.to_dict())
        return
    for stage in result.stages:
        say(f"hvtsm: stage {stage.name} (zone {stage.zone_id}) {stage.state}: "
            f"{stage.ended or stage.reason}")
        if not stage.ok and stage.stderr:
            say(stage.stderr.decode("utf-8", errors="replace").rstrip())
        for stream, dropped in stage.truncated.items():
            say(f"hvtsm: stage {stage.name}: its {stream} was cut at {format_size(MAX_OUTPUT)}"
                f" ({dropped} more bytes read and dropped)")
    for name in result.skipped:
        say(f"hvtsm: stage {name} not run: an earlier stage failed")
    say(f"hvtsm: pipeline group {result.group} {'done' if result.ok else 'FAILED'} "
        f"(audit: hvtsm audit ZONE for each zone above)")
    sys.stdout.buffer.write(result.output)
    sys.stdout.flush()
