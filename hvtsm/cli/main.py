"""Entry point: argument parsing, dispatch, and the mapping of errors to exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from hvtsm import __version__
from hvtsm.cli import (
    admin_cmd,
    analyze_cmd,
    image_cmd,
    pipeline_cmd,
    policy_cmd,
    run_cmd,
    template_cmd,
)
from hvtsm.cli.exits import EXIT_HVTSM_ERROR, EXIT_USAGE
from hvtsm.errors import HvtsmError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hvtsm",
        description="Temporal Sandbox Manager: run code in zones whose permissions tighten "
        "over their lifespan.",
    )
    parser.add_argument("--version", action="version", version=f"hvtsm {__version__}")
    parser.add_argument("--db", metavar="URL",
                        help="SQLAlchemy URL of the store (default: $HVTSM_DB, else "
                        "sqlite:////var/lib/hvtsm/hvtsm.db as root)")
    parser.add_argument("--debug", action="store_true",
                        help="log details and show tracebacks")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    run_cmd.add_parsers(commands)
    policy_cmd.add_parsers(commands)
    admin_cmd.add_parsers(commands)
    template_cmd.add_parsers(commands)
    image_cmd.add_parsers(commands)
    analyze_cmd.add_parsers(commands)
    pipeline_cmd.add_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="hvtsm: %(levelname)s %(name)s: %(message)s")
    if not args.debug:
        # APScheduler logs every job run at INFO; keep the live lines readable
        logging.getLogger("apscheduler").setLevel(logging.ERROR)
    try:
        return int(args.handler(args))
    except HvtsmError as exc:
        if args.debug:
            raise
        print(f"hvtsm: error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"hvtsm: hint: {exc.hint}", file=sys.stderr)
        return EXIT_HVTSM_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
