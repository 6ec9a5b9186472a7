"""The monitor's pure judge (guest_agent/judge.py) on plain values: calls, profiles and
facts built here, no seccomp and no /proc. The PATH search cases are the regression of an
exec that could not succeed being judged as if it ran."""

from __future__ import annotations

import errno

import pytest

from guest_agent.calls import (
    O_CREAT,
    O_TMPFILE_BIT,
    ConnectCall,
    DeniedCall,
    ExecCall,
    ForeignCall,
    OpenCall,
)
from guest_agent.judge import Action, Facts, creates_file, judge
from guest_agent.profile import Profile

TRANSIENT = {"triggers": ["exec", "connect"], "expect_exec": ["/usr/bin/python3*"]}
DENY_HOME_TMP = Profile(deny_exec=("/tmp/**", "/home/**"))


def execve(path: str, *argv: str) -> ExecCall:
    return ExecCall("execve", path, argv or (path,), raw=path)


# --- exec: a PATH search ------------------------------------------------------------------


@pytest.mark.parametrize("error", [errno.ENOENT, errno.ENOTDIR, errno.ELOOP,
                                   errno.ENAMETOOLONG])
def test_an_exec_whose_target_is_missing_fails_quietly(error: int) -> None:
    for path in ("/tmp/venv/bin/ls", "/home/u/.local/bin/ls"):
        verdict = judge(execve(path, "ls"), DENY_HOME_TMP, Facts(lookup_error=error))
        assert verdict is not None and verdict.action is Action.FAIL
        assert verdict.error == error  # the errno the kernel would have given


def test_a_missing_target_is_no_first_exec_and_no_code_path() -> None:
    profile = Profile.from_dict({"transient": TRANSIENT})
    first = judge(execve("/tmp/venv/bin/python3"), profile,
                  Facts(first_exec_done=False, lookup_error=errno.ENOENT))
    assert first is not None and first.action is Action.FAIL
    # the real program, once it is found, is the workload's own: allowed, not held
    assert judge(execve("/usr/bin/ls"), profile, Facts(first_exec_done=False)) is None
    # later, a missing target is still no code path: nothing would run
    later = judge(execve("/tmp/venv/bin/tool"), profile, Facts(lookup_error=errno.ENOENT))
    assert later is not None and later.action is Action.FAIL


def test_other_lookup_errors_are_judged_as_the_exec() -> None:
    # EACCES: the kernel fails the exec itself, and a PATH search goes on; the attempt is
    # judged (only a missing target is certain never to run)
    verdict = judge(execve("/tmp/venv/bin/ls"), DENY_HOME_TMP,
                    Facts(lookup_error=errno.EACCES))
    assert verdict is not None and verdict.category == "unexpected-exec"


def test_an_existing_target_is_judged() -> None:
    verdict = judge(execve("/tmp/venv/bin/ls", "ls"), DENY_HOME_TMP, Facts())
    assert verdict is not None and verdict.action is Action.ANOMALY
    assert verdict.category == "unexpected-exec" and verdict.syscall == "execve"
    assert verdict.args == {"path": "/tmp/venv/bin/ls", "argv": ["ls"]}
    assert "deny_exec /tmp/**" in verdict.detail
    assert judge(execve("/usr/bin/ls"), DENY_HOME_TMP, Facts()) is None


def test_what_is_really_execd_is_judged() -> None:
    # /usr/local/bin/ls is a symlink into /tmp: denied by what it resolves to
    verdict = judge(execve("/usr/local/bin/ls"), DENY_HOME_TMP,
                    Facts(real_path="/tmp/x/ls"))
    assert verdict is not None and "/tmp/x/ls" in verdict.detail
    # a link in a denied place to an allowed program is still denied by its own path
    assert judge(execve("/tmp/x/ls"), DENY_HOME_TMP, Facts(real_path="/usr/bin/ls"))
    allow = Profile(allow_exec=("/usr/**",))
    # outside allow_exec by name, inside by what it is: allowed
    assert judge(execve("/bin/ls"), allow, Facts(real_path="/usr/bin/ls")) is None


def test_the_first_exec_is_always_allowed() -> None:
    denied = Profile(deny_exec=("/usr/**",), deny_syscalls=("execve",))
    assert judge(execve("/usr/bin/python3"), denied, Facts(first_exec_done=False)) is None
    verdict = judge(execve("/usr/bin/python3"), denied, Facts())
    assert verdict is not None and verdict.category == "denied-syscall"


def test_reverse_shell() -> None:
    facts = Facts(stdio=("socket:[123]", "/dev/null"))
    verdict = judge(execve("/bin/sh", "sh"), Profile(), facts)
    assert verdict is not None and verdict.category == "reverse-shell"
    assert "socket on stdin" in verdict.detail
    assert judge(execve("/bin/sh"), Profile(), Facts(stdio=("/dev/null", "pipe:[1]"))) is None
    # a shell by what it resolves to
    assert judge(execve("/usr/bin/sh-link"), Profile(),
                 Facts(real_path="/usr/bin/dash", stdio=("", "socket:[9]"))) is not None


def test_an_unforeseen_exec_is_held_unless_expected_or_in_a_zone() -> None:
    profile = Profile.from_dict({"transient": TRANSIENT})
    held = judge(execve("/usr/bin/curl"), profile, Facts())
    assert held is not None and held.action is Action.HOLD and held.trigger == "exec"
    assert held.category == "code-path" and held.args["path"] == "/usr/bin/curl"
    assert judge(execve("/usr/bin/python3.11"), profile, Facts()) is None
    assert judge(execve("/usr/bin/py"), profile, Facts(real_path="/usr/bin/python3")) is None
    assert judge(execve("/usr/bin/curl"), profile, Facts(zone="zt1")) is None


# --- connect ------------------------------------------------------------------------------


def test_connect_verdicts() -> None:
    out = ConnectCall("inet", "10.1.2.3", 443)
    verdict = judge(out, Profile(network="none"), Facts())
    assert verdict is not None and verdict.category == "connect-out"
    assert verdict.args == {"family": "inet", "address": "10.1.2.3", "port": 443}
    assert judge(ConnectCall("inet", "127.0.0.1", 80), Profile(network="none"), Facts()) is None
    assert judge(ConnectCall("none"), Profile(network="none"), Facts()) is None
    assert judge(ConnectCall("16"), Profile(network="none"), Facts()) is None
    unix = ConnectCall("unix", path="/run/secret.sock")
    assert judge(unix, Profile(sensitive_paths=("/run/*.sock",)), Facts()) is not None
    assert unix.args == {"family": "unix", "path": "/run/secret.sock"}


def test_a_transient_zone_connects_by_its_own_network() -> None:
    out = ConnectCall("inet6", "2001:db8::1", 9)
    verdict = judge(out, Profile(), Facts(zone="zt1", zone_network="loopback"))
    assert verdict is not None and "transient zone zt1's network is loopback" in verdict.detail
    assert judge(out, Profile(), Facts(zone="zt1", zone_network="full")) is None


def test_a_first_connect_is_held_except_the_workloads_own() -> None:
    profile = Profile.from_dict({"transient": TRANSIENT})
    out = ConnectCall("inet", "192.0.2.7", 80)
    held = judge(out, profile, Facts(pid=12, root_pid=10))
    assert held is not None and held.action is Action.HOLD and held.trigger == "connect"
    assert judge(out, profile, Facts(pid=10, root_pid=10)) is None
    assert judge(ConnectCall("inet", "127.0.0.1", 80), profile, Facts(pid=12)) is None


# --- open and the rest --------------------------------------------------------------------


def test_sensitive_and_new_file_rate() -> None:
    profile = Profile(sensitive_paths=("/etc/shadow",), max_new_files_per_s=3)
    write = OpenCall("openat", "/etc/shadow", O_CREAT | 1)
    verdict = judge(write, profile, Facts(path_exists=True))
    assert verdict is not None and verdict.detail.startswith("write of /etc/shadow")
    assert not creates_file(write, profile, False)  # its own anomaly, not a new file
    new = OpenCall("openat", "/tmp/f", O_CREAT | 1)
    assert creates_file(new, profile, False) and not creates_file(new, profile, True)
    assert creates_file(OpenCall("openat", "/tmp", O_TMPFILE_BIT | 2), profile, True)
    assert judge(new, profile, Facts(path_exists=False, new_files=3)) is None
    rate = judge(new, profile, Facts(path_exists=False, new_files=4))
    assert rate is not None and rate.rate and rate.category == "new-file-rate"
    assert rate.detail == "4 files created in the last second (limit 3)"
    # an open of a file that is there creates nothing, whatever the count says
    assert judge(new, profile, Facts(path_exists=True, new_files=99)) is None


def test_denied_syscall_and_foreign_abi() -> None:
    denied = judge(DeniedCall("ptrace", {"request": "ATTACH", "target": 1}), Profile(),
                   Facts())
    assert denied is not None and denied.category == "denied-syscall"
    assert denied.detail == "ptrace is in deny_syscalls" and denied.syscall == "ptrace"
    foreign = judge(ForeignCall(11, "arch 0x40000003", (1, 2)), Profile(), Facts())
    assert foreign is not None and foreign.category == "foreign-abi"
    assert foreign.syscall is None and foreign.args == {"raw": ["0x1", "0x2"]}
