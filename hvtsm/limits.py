"""Every bound hvtsm puts on what it is given: files, policies, programs, output.

Input a zone could not use, or that would cost time or memory out of proportion to what it
says, is refused with an error that names the file, the field and the limit; nothing hvtsm
reads is allowed to grow without bound. The profile limits (globs, lists) are the guest
agent's own (it checks every profile it is sent, and must stay stdlib-only), re-exported
here so this module lists them all. README.md "Limits on input" is the user's copy.
"""

from __future__ import annotations

import reprlib

from guest_agent.profile import (
    MAX_DOUBLESTARS,
    MAX_EXPECTED_PROGRAMS,
    MAX_GLOB_LENGTH,
    MAX_PROFILE_LIST,
)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# --- files: refused before they are read whole -------------------------------------------

#: a policy file (the shipped ones are about 2 KiB)
MAX_POLICY_BYTES = 1 * MiB
#: a pipeline manifest
MAX_MANIFEST_BYTES = 1 * MiB
#: a Python program or shell script to analyze (the parser's memory grows ~50x the text)
MAX_SOURCE_BYTES = 4 * MiB
#: an ELF binary to analyze (read whole for its symbol table; /usr/bin/python3.11 is 6.5 MiB)
MAX_BINARY_BYTES = 128 * MiB
#: code `hvtsm invoke` stores and runs: it travels through the store and a guest's 9p root
MAX_CODE_BYTES = 16 * MiB
#: a program importing more local files than this is refused rather than walked on
MAX_LOCAL_FILES = 200

# --- the shape of a policy document ------------------------------------------------------

#: tables and arrays inside one another (the shipped policies nest 5 deep)
MAX_NESTING = 8
#: entries of any one array or table, unless a field has a smaller limit of its own
MAX_ITEMS = 1024
#: characters of any string value (globs: MAX_GLOB_LENGTH)
MAX_STRING = 4096
#: characters of a key
MAX_KEY = 128
#: characters of a policy's or a zone's name
MAX_NAME = 128

# --- policy fields ------------------------------------------------------------------------

#: [[phase]] tables of one policy
MAX_PHASES = 256
#: egress entries of one phase (the monotonicity check indexes them: linear, not quadratic)
MAX_EGRESS = 1024
#: [[segment]] selectors and [[channel]] grants of one policy
MAX_SEGMENTS = 256
MAX_CHANNELS = 256
#: globs of sensitive_paths, allow_exec, deny_exec and [transient] expect_exec; syscall names
MAX_GLOBS = MAX_PROFILE_LIST
#: a phase's `at` (and any duration): ten years, far below where a datetime overflows
#: (year 9999) even at the largest lifespan_scale (100)
MAX_DURATION_MS = 3650 * 24 * 3600 * 1000
#: any size: 1 EiB (the kernel's page counters stop near 8 EiB)
MAX_SIZE = 1024**6
#: below this a zone cannot even start a shell; a typo like '16KiB' is caught here
MIN_MEMORY = 4 * MiB
#: the highest CPU number Linux can have (CONFIG_NR_CPUS is at most 8192); a policy's
#: `cpus` must moreover name CPUs of this host
MAX_CPU = 8191
#: cpu_quota, in percent of one CPU: all the CPUs Linux can have
MAX_CPU_QUOTA = 100 * (MAX_CPU + 1)
#: [anomaly] factor (the remaining lifespan is divided by it)
MAX_FACTOR = 1_000_000
#: a channel's max_rate, messages per second
MAX_CHANNEL_RATE = 1_000_000
#: the largest channel message a grant may allow (messages travel in pieces over the link)
MAX_CHANNEL_MESSAGE = 16 * MiB

# --- output --------------------------------------------------------------------------------

#: bytes of workload output in one `hvtsm run --json` output event; a longer line is sent
#: as several events, all but the last marked "partial"
MAX_OUTPUT_EVENT = 64 * KiB
#: bytes of each output stream kept (invoke results, a pipeline stage's output and stderr);
#: the rest is counted, not kept
MAX_OUTPUT = 4 * MiB

_shown = reprlib.Repr()
_shown.maxstring = 60
_shown.maxother = 60
_shown.maxlist = _shown.maxdict = _shown.maxtuple = 4
_shown.maxlevel = 2


def shown(value: object) -> str:
    """`value` as an error message may quote it: its repr, cut short (a message must stay
    readable whatever size the value was)."""
    return _shown.repr(value)


__all__ = [
    "MAX_BINARY_BYTES", "MAX_CHANNELS", "MAX_CHANNEL_MESSAGE", "MAX_CHANNEL_RATE",
    "MAX_CODE_BYTES", "MAX_CPU", "MAX_CPU_QUOTA", "MAX_DOUBLESTARS", "MAX_DURATION_MS",
    "MAX_EGRESS", "MAX_EXPECTED_PROGRAMS", "MAX_FACTOR", "MAX_GLOBS", "MAX_GLOB_LENGTH",
    "MAX_ITEMS", "MAX_KEY", "MAX_LOCAL_FILES", "MAX_MANIFEST_BYTES", "MAX_NAME",
    "MAX_NESTING", "MAX_OUTPUT", "MAX_OUTPUT_EVENT", "MAX_PHASES", "MAX_POLICY_BYTES",
    "MAX_PROFILE_LIST", "MAX_SEGMENTS", "MAX_SIZE", "MAX_SOURCE_BYTES", "MAX_STRING",
    "MIN_MEMORY", "GiB", "KiB", "MiB", "shown",
]
