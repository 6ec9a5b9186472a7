"""`hvtsm policy validate` and `hvtsm policy show`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from hvtsm.cli.exits import EXIT_INVALID, EXIT_OK
from hvtsm.cli.output import say, table
from hvtsm.errors import PolicyError
from hvtsm.policy import Policy, load_policy
from hvtsm.policy.compare import weaker_than
from hvtsm.policy.segments import choose
from hvtsm.units import format_duration_ms


def add_parsers(commands: Any) -> None:
    policy = commands.add_parser("policy", help="check and explain policy files",
                                 description="Check and explain policy files.")
    sub = policy.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")
    sub.required = True
    validate = sub.add_parser("validate", help="check policy files (exit 1 if any is invalid)",
                              description="Check policy files; exit 0 when all are valid "
                              "(and, with --against, none is weaker than the reference), "
                              "1 otherwise. Each error names file, phase and field.")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.add_argument("--against", metavar="POLICY",
                          help="also report where each file's anomaly profile detects or "
                          "reacts less than POLICY's (a name in the policy directory or a "
                          "path), field by field; any such finding exits 1")
    validate.add_argument("--json", action="store_true", help="one JSON object per file")
    validate.set_defaults(handler=cmd_validate)
    show = sub.add_parser("show", help="print a policy's timeline",
                          description="Print when each restriction tightens.")
    show.add_argument("file", metavar="FILE")
    show.add_argument("--role", help="show the timeline as scaled for this segment role")
    show.add_argument("--capability", action="append", default=[],
                      help="segment capability (repeatable)")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=cmd_show)


def check_references(policy: Policy) -> None:
    """The policies a policy names must exist and be valid too: a typo there would only
    show when a segment or a transient zone is made."""
    from hvtsm.policy.catalog import load_referenced

    for index, selector in enumerate(policy.segments):
        if selector.policy is not None:
            load_referenced(selector.policy, beside=policy.source,
                            field=f"segment[{index}].policy")
    if policy.transient.policy is not None:
        load_referenced(policy.transient.policy, beside=policy.source,
                        field="transient.policy")


def cmd_validate(args: argparse.Namespace) -> int:
    status = EXIT_OK
    reference = None
    if args.against is not None:
        from hvtsm.policy.catalog import load_referenced

        try:
            reference = load_referenced(args.against, beside=None, field="--against")
        except PolicyError as exc:
            say(f"hvtsm: error: invalid reference policy {exc}")
            return EXIT_INVALID
    for path in args.files:
        try:
            policy = load_policy(path)
            check_references(policy)
        except PolicyError as exc:
            status = EXIT_INVALID
            if args.json:
                print(json.dumps({"file": path, "valid": False, "error": exc.detail,
                                  "phase": exc.phase, "field": exc.field}))
            else:
                say(f"hvtsm: error: invalid policy {exc}")
            continue
        weaker = [] if reference is None else weaker_than(policy, reference)
        if weaker:
            status = EXIT_INVALID
        if args.json:
            out: dict[str, Any] = {"file": path, "valid": True, "name": policy.name,
                                   "phases": len(policy.phases),
                                   "lifespan_ms": policy.lifespan_ms}
            if reference is not None:
                out["against"] = reference.name
                out["weaker"] = [{"field": w.field, "detail": w.detail} for w in weaker]
            print(json.dumps(out))
            continue
        life = ("no lifespan limit" if policy.lifespan_ms is None
                else f"lifespan {format_duration_ms(policy.lifespan_ms)}")
        print(f"ok: {path}: policy {policy.name}, {len(policy.phases)} phases, {life}")
        if reference is not None and not weaker:
            print(f"  detects and reacts at least as much as {reference.name}")
        for finding in weaker:
            print(f"  weaker than {reference.name if reference else ''}: {finding}")
    return status


def timeline_rows(policy: Policy, scale: float) -> list[dict[str, Any]]:
    rows = []
    previous = None
    for phase in policy.phases:
        if phase.terminate:
            what = {"action": "terminate"}
        elif previous is None:
            what = phase.restrictions.describe() or {"network": "full"}
        else:
            what = phase.restrictions.changes_from(previous)
        rows.append({"phase": phase.index, "at_ms": phase.at_ms * scale, "tightens": what})
        previous = phase.restrictions
    return rows


def cmd_show(args: argparse.Namespace) -> int:
    # what a zone of that role and capabilities would get (maybe a policy the selector names)
    choice = choose(load_policy(args.file), [(args.role, frozenset(args.capability))])
    policy, scale = choice.policy, choice.scale
    rows = timeline_rows(policy, scale)
    if args.json:
        print(json.dumps({
            "name": policy.name, "description": policy.description, "scale": scale,
            "timeline": rows,
            "anomaly": {"deny_syscalls": list(policy.anomaly.watch.deny_syscalls),
                        "sensitive_paths": list(policy.anomaly.watch.sensitive_paths),
                        "reaction": str(policy.anomaly.reaction),
                        "factor": policy.anomaly.factor},
            "segments": [{"role": s.role, "capabilities": list(s.capabilities),
                          "lifespan_scale": s.lifespan_scale} for s in policy.segments],
        }, indent=2))
        return EXIT_OK
    print(f"policy {policy.name}: {policy.description}")
    if scale != 1:
        print(f"(timeline scaled by {scale:g} for this segment)")
    print(table(["PHASE", "AT", "TIGHTENS"], [
        [r["phase"], format_duration_ms(r["at_ms"]),
         ", ".join(f"{k} {v}" for k, v in r["tightens"].items())] for r in rows]))
    rules, watch = policy.anomaly, policy.anomaly.watch
    print(f"anomalies: deny syscalls {', '.join(watch.deny_syscalls) or '-'}; sensitive paths "
          f"{', '.join(watch.sensitive_paths) or '-'}; reaction {rules.reaction}"
          + (f" x{rules.factor:g}" if str(rules.reaction) == "accelerate" else ""))
    for s in policy.segments:
        match = ", ".join(filter(None, [f"role {s.role}" if s.role else "",
                                        *[f"capability {c}" for c in s.capabilities]]))
        print(f"segment {match}: lifespan x{s.lifespan_scale:g}")
    return EXIT_OK
