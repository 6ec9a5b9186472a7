"""`hvtsm analyze`: which capabilities each part of a program uses, and how risky that is."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hvtsm.analysis import analyze
from hvtsm.cli.exits import EXIT_INVALID, EXIT_OK
from hvtsm.cli.output import table
from hvtsm.errors import AnalysisError


def add_parsers(commands: Any) -> None:
    parser = commands.add_parser(
        "analyze", help="risk analysis of a program (Python, shell script or ELF binary)",
        description="Read a program without running it and list its segments (functions, "
        "module code, a script, a binary) with the capabilities they use (network, exec, "
        "file-write, native, dynamic-code, input-parsing, ptrace, privileged), a risk level, "
        "and the file:line of every reason. Exit 0 when analyzed, 1 when the input cannot "
        "be analyzed.")
    parser.add_argument("path", metavar="PATH", help="a .py file, a shell script or an ELF file")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=cmd_analyze)


def cmd_analyze(args: argparse.Namespace) -> int:
    try:
        report = analyze(args.path)
    except AnalysisError as exc:
        # unanalyzable input is an answer about the input, like an invalid policy, so it
        # gets exit 1 rather than the 125 of an hvtsm failure
        print(f"hvtsm: error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"hvtsm: hint: {exc.hint}", file=sys.stderr)
        return EXIT_INVALID
    if args.json:
        print(report.to_json())
        return EXIT_OK
    print(f"{report.path} ({report.language})")
    print(table(["SEGMENT", "KIND", "RISK", "CAPABILITIES"], [
        [s.name, s.kind, s.risk, ", ".join(sorted(s.capabilities)) or "-"]
        for s in report.segments]))
    reasons = [r for s in report.segments for r in s.reasons]
    if reasons:
        print()
        for r in reasons:
            print(f"{r.file}:{r.line} {r.capability} {r.detail}")
    if report.programs():
        print(f"\nprograms it runs: {', '.join(report.programs())}")
    return EXIT_OK
