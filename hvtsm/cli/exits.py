"""Exit statuses of `hvtsm`, in one place (also listed in the README)."""

EXIT_OK = 0
#: `policy validate` found an invalid policy; `cleanup` could not remove something
EXIT_INVALID = 1
EXIT_USAGE = 2
#: the zone was ended by its policy, a reaction or an operator (like timeout(1))
EXIT_TERMINATED = 124
#: hvtsm itself failed (bad input, host not usable, store not reachable)
EXIT_HVTSM_ERROR = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127
EXIT_INTERRUPTED = 130


def from_status(status: int | None) -> int:
    """Shell convention for a workload's exit status: 128+N when killed by signal N."""
    if status is None:
        return EXIT_OK
    return 128 - status if status < 0 else status
