"""`--env NAME=VALUE` and `--pass-env NAME`: what a zone's workload gets on top of its clean
environment (hvtsm/zones/environment.py)."""

from __future__ import annotations

import argparse
import os

from hvtsm.zones.environment import ZoneEnv, from_options


def add_env_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="set a variable in the workload's environment (repeatable); "
                        "the workload starts from a clean one (PATH, LANG, HOME, TERM, "
                        "USER), never the operator's")
    parser.add_argument("--pass-env", action="append", default=[], metavar="NAME",
                        help="pass this variable of the operator's environment (repeatable; "
                        "an error when it is not set). The audit records names, not values")


def zone_env(args: argparse.Namespace) -> ZoneEnv:
    """Raises EnvError naming the option."""
    return from_options(args.env, args.pass_env, os.environ)
