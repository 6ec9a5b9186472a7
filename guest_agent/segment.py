"""Runs one pipeline segment inside its zone (stdlib only, Python >= 3.9).

    python3 /path/to/guest_agent/segment.py --name parse --recv-from fetch --send-to compute
        --program /srv/report.py --call parse_rows,clean      (function segment)
        ... --command -- sort -u                               (command segment)

The segment takes its input from the previous segment's channel message (the first segment
takes the pipeline's arguments instead), runs, and passes its result to the next segment's
channel; the last one prints it. Values travel as JSON; bytes are tagged so they survive.

Exit status: the failing function's traceback and 1; 3 when a channel refused a message;
4 when the input never came; 2 for a bad command line.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import subprocess
import sys
import traceback
from typing import Any

if __package__ in (None, ""):
    # run as a file (the zone may not have the agent on its path): the package is one up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guest_agent.channel import ChannelError, ChannelRefused, open_channel

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_NO_INPUT = 4
_BYTES_TAG = "__bytes__"


def encode(value: Any) -> bytes:
    def tag(obj: Any) -> Any:
        if isinstance(obj, (bytes, bytearray)):
            return {_BYTES_TAG: base64.b64encode(bytes(obj)).decode("ascii")}
        if isinstance(obj, (tuple, set, frozenset)):
            return list(obj)
        raise TypeError(f"a segment's result must be JSON data or bytes, not "
                        f"{type(obj).__name__}")

    return json.dumps(value, default=tag, separators=(",", ":")).encode("utf-8")


def decode(data: bytes) -> Any:
    def untag(obj: dict[str, Any]) -> Any:
        if len(obj) == 1 and _BYTES_TAG in obj:
            return base64.b64decode(obj[_BYTES_TAG])
        return obj

    return json.loads(data.decode("utf-8"), object_hook=untag)


def _load(program: str) -> Any:
    name = os.path.splitext(os.path.basename(program))[0]
    spec = importlib.util.spec_from_file_location(name, program)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {program}")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(program)))
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _receive(channel: Any, source: str, timeout: float) -> bytes:
    """The previous segment's message; anything from another zone is reported and dropped
    (the broker only delivers what a grant allows, but only `source` is this segment's input)."""
    while True:
        got: tuple[str, bytes] = channel.recv(timeout=timeout)
        sender, data = got
        if sender == source:
            return data
        print(f"segment: ignored a message from {sender!r} (input comes from {source!r})",
              file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    channel = open_channel() if (args.recv_from or args.send_to) else None
    if args.recv_from:
        try:
            raw = _receive(channel, args.recv_from, args.input_timeout)
        except TimeoutError:
            print(f"segment {args.name}: no input from {args.recv_from!r} within "
                  f"{args.input_timeout:g} s", file=sys.stderr)
            return EXIT_NO_INPUT
    else:
        raw = None
    if args.command:
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        done = subprocess.run(command, input=raw or b"", stdout=subprocess.PIPE, check=False)
        if done.returncode != 0:
            print(f"segment {args.name}: {command[0]} exited with {done.returncode}",
                  file=sys.stderr)
            return done.returncode if done.returncode > 0 else EXIT_FAILED
        result = done.stdout
        out = result
    else:
        module = _load(args.program)
        value: Any = decode(raw) if raw is not None else None
        functions = [getattr(module, name) for name in args.call.split(",")]
        # the first segment's first function takes the pipeline's arguments
        value = functions[0](*json.loads(args.args)) if raw is None else functions[0](value)
        for function in functions[1:]:
            value = function(value)
        result = encode(value)
        out = result + b"\n"
    if args.send_to:
        assert channel is not None
        try:
            channel.send(args.send_to, result, timeout=args.send_timeout)
        except ChannelRefused as exc:
            print(f"segment {args.name}: the channel to {args.send_to!r} refused the result: "
                  f"{exc.reason}", file=sys.stderr)
            return EXIT_REFUSED
    else:
        sys.stdout.buffer.write(out)
        sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="this segment's name")
    parser.add_argument("--recv-from", help="segment whose message is the input")
    parser.add_argument("--send-to", help="segment that gets the result")
    parser.add_argument("--program", help="Python program of a function segment")
    parser.add_argument("--call", help="its functions to call in order, comma-separated")
    parser.add_argument("--args", default="[]",
                        help="JSON list: the first function's arguments (first segment)")
    parser.add_argument("--input-timeout", type=float, default=60.0)
    parser.add_argument("--send-timeout", type=float, default=30.0)
    parser.add_argument("--command", nargs=argparse.REMAINDER,
                        help="-- COMMAND: a command segment (input on stdin, result on stdout)")
    args = parser.parse_args(argv)
    if bool(args.command) == bool(args.program and args.call):
        parser.print_usage(sys.stderr)
        print("segment: give either --program and --call or --command", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run(args)
    except ChannelError as exc:
        print(f"segment {args.name}: channel: {exc}", file=sys.stderr)
        return EXIT_REFUSED if isinstance(exc, ChannelRefused) else EXIT_USAGE
    except Exception:  # the program's own failure: its traceback is the useful part
        traceback.print_exc()
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
