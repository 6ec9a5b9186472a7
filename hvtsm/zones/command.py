"""The one way zone backends run a program (ip, nft, helper children)."""

from __future__ import annotations

import logging
import shlex
import subprocess
from collections.abc import Callable, Sequence

from hvtsm.errors import ZoneError

log = logging.getLogger(__name__)


def run(argv: Sequence[str], *, input: str | None = None, check: bool = True,
        zone_id: str | None = None,
        preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `argv` to completion. With `check`, a failure becomes a ZoneError that names the
    command and carries its stderr, which is where ip and nft say what went wrong."""
    log.debug("run %s", shlex.join(argv))
    try:
        result = subprocess.run(
            list(argv), input=input, text=True, capture_output=True,
            stdin=None if input is not None else subprocess.DEVNULL,
            preexec_fn=preexec_fn, check=False,
        )
    except FileNotFoundError as exc:
        raise ZoneError(f"cannot run `{shlex.join(argv)}`: {argv[0]} not found",
                        zone_id=zone_id) from exc
    if check and result.returncode != 0:
        detail = result.stderr.strip() or result.stdout.strip() or "no message"
        raise ZoneError(
            f"`{shlex.join(argv)}` failed with exit status {result.returncode}: {detail}",
            zone_id=zone_id,
        )
    return result
