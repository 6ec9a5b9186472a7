"""The seccomp filter's program, decoded from its packed bytes and run by a tiny classic-BPF
interpreter on sample seccomp_data: which calls reach the agent and which the kernel lets
through on its own."""

from __future__ import annotations

import struct

import pytest

from guest_agent import seccomp
from guest_agent.profile import Profile
from guest_agent.syscalls import X86_64, name, number, numbers

NOTIFY = seccomp.SECCOMP_RET_USER_NOTIF
ALLOW = seccomp.SECCOMP_RET_ALLOW
I386 = 0x40000003


def seccomp_data(nr: int, args: tuple[int, ...] = (), arch: int = seccomp.AUDIT_ARCH_X86_64
                 ) -> bytes:
    full = (list(args) + [0] * 6)[:6]
    return struct.pack("<IIQ6Q", nr, arch, 0x401000, *full)


def run(code: bytes, data: bytes) -> int:
    """Classic BPF as the kernel's seccomp runs it (only the opcodes a filter may use that
    ours does: ld w abs, jeq/jge/jset k, ret k); anything else fails the test."""
    insns = [struct.unpack_from("<HBBI", code, i) for i in range(0, len(code), 8)]
    acc = 0
    pc = 0
    steps = 0
    while True:
        steps += 1
        assert steps <= len(insns), "the program loops"  # cBPF jumps only forward
        op, jt, jf, k = insns[pc]
        if op == seccomp.BPF_LD_W_ABS:
            assert k % 4 == 0 and k + 4 <= len(data), f"bad load offset {k}"
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif op in (seccomp.BPF_JEQ_K, seccomp.BPF_JGE_K, seccomp.BPF_JSET_K):
            taken = {seccomp.BPF_JEQ_K: acc == k, seccomp.BPF_JGE_K: acc >= k,
                     seccomp.BPF_JSET_K: bool(acc & k)}[op]
            pc += 1 + (jt if taken else jf)
        elif op == seccomp.BPF_RET_K:
            return k
        else:
            raise AssertionError(f"unexpected opcode {op:#x}")
        assert pc < len(insns), "jumped past the end"


def verdict(profile: Profile, nr: int | str, *args: int, arch: int = seccomp.AUDIT_ARCH_X86_64
            ) -> int:
    nr = number(nr) if isinstance(nr, str) else nr
    code = seccomp.pack_program(seccomp.build_program(profile.deny_syscalls))
    return run(code, seccomp_data(nr, args, arch))


def test_program_shape() -> None:
    prog = seccomp.build_program(("ptrace",))
    code = seccomp.pack_program(prog)
    assert len(code) == 8 * len(prog) and len(prog) < 64
    # arch first, then the syscall number, and the last instruction allows
    assert prog[0] == (seccomp.BPF_LD_W_ABS, 0, 0, 4)
    assert prog[1][3] == seccomp.AUDIT_ARCH_X86_64
    assert prog[3] == (seccomp.BPF_LD_W_ABS, 0, 0, 0)
    assert prog[-1] == (seccomp.BPF_RET_K, 0, 0, ALLOW)
    assert all(jt <= 255 and jf <= 255 for _, jt, jf, _ in prog)


def test_plain_calls_stay_in_the_kernel() -> None:
    p = Profile()
    for call in ("read", "write", "mmap", "futex", "close", "getpid", "exit_group", "stat",
                 "socket", "bind", "sendto", "ptrace"):
        assert verdict(p, call) == ALLOW, call


def test_always_notified() -> None:
    p = Profile()
    for call in ("execve", "execveat", "connect", "creat", "openat2"):
        assert verdict(p, call) == NOTIFY, call


def test_deny_list_notified() -> None:
    p = Profile(deny_syscalls=("ptrace", "bpf", "init_module", "mount", "read"))
    for call in p.deny_syscalls:
        assert verdict(p, call) == NOTIFY, call
    assert verdict(p, "write") == ALLOW


def test_process_creation_not_notified() -> None:
    """A notified fork fails with EINTR when a signal lands while it waits for the agent
    (seccomp_do_user_notification waits interruptibly): forks stay in the kernel."""
    p = Profile()
    thread_flags = 0x3D0F00  # what pthread_create passes: CLONE_VM|CLONE_THREAD|...
    assert verdict(p, "clone", thread_flags) == ALLOW
    assert verdict(p, "clone", 0x01200011) == ALLOW  # fork(): CHILD_SETTID|CLEARTID|SIGCHLD
    for call in ("clone3", "fork", "vfork"):
        assert verdict(p, call) == ALLOW, call
    assert not set(numbers(seccomp.PROCESS_CREATION)) & seccomp.notified_numbers(p)
    # denied outright: every call, threads too (the policy asked for it)
    assert verdict(Profile(deny_syscalls=("clone",)), "clone", thread_flags) == NOTIFY
    assert verdict(Profile(deny_syscalls=("fork",)), "fork") == NOTIFY


def test_opens_notified_only_when_creating_or_writing() -> None:
    p = Profile()
    o_rdonly, o_wronly, o_rdwr, o_creat, o_trunc = 0, 1, 2, 0o100, 0o1000
    o_tmpfile = 0o20000000 | 0o200000
    assert verdict(p, "openat", 0xFFFFFF9C, 0x1000, o_rdonly) == ALLOW
    assert verdict(p, "openat", 0xFFFFFF9C, 0x1000, o_rdonly | o_trunc) == ALLOW
    # a write (into /proc/PID/mem, say) is looked at, created or not
    assert verdict(p, "openat", 0xFFFFFF9C, 0x1000, o_wronly | o_trunc) == NOTIFY
    assert verdict(p, "openat", 0xFFFFFF9C, 0x1000, o_rdwr) == NOTIFY
    assert verdict(p, "open", 0x1000, o_rdwr) == NOTIFY
    assert verdict(p, "openat", 0xFFFFFF9C, 0x1000, o_wronly | o_creat) == NOTIFY
    assert verdict(p, "openat", 0xFFFFFF9C, 0x1000, o_tmpfile | 2) == NOTIFY
    assert verdict(p, "open", 0x1000, o_rdonly) == ALLOW
    assert verdict(p, "open", 0x1000, o_creat | o_wronly) == NOTIFY
    # the flag must be looked for in the right argument
    assert verdict(p, "openat", o_creat, 0x1000, 0) == ALLOW
    assert verdict(p, "open", 0x1000, 0, o_creat) == ALLOW
    assert verdict(Profile(deny_syscalls=("openat",)), "openat", 0, 0x1000, 0) == NOTIFY


def test_foreign_abis_notified() -> None:
    p = Profile()
    assert verdict(p, 11, arch=I386) == NOTIFY  # i386 execve via int 0x80
    assert verdict(p, 0, arch=I386) == NOTIFY
    assert verdict(p, seccomp.X32_SYSCALL_BIT | 0) == NOTIFY  # x32 read
    assert verdict(p, 0xFFFFFFFF) == NOTIFY  # -1: nothing sneaks past the range check


def test_long_deny_list_keeps_jumps_short() -> None:
    every = tuple(n for n in X86_64 if n not in ("openat", "open", "clone"))
    prog = seccomp.build_program(every)
    assert len(prog) <= seccomp.BPF_MAXINSNS
    code = seccomp.pack_program(prog)
    for call in ("read", "ptrace", "file_setattr"):
        assert run(code, seccomp_data(number(call))) == NOTIFY
    assert run(code, seccomp_data(number("openat"), (0, 0, 0))) == ALLOW


def test_notified_numbers() -> None:
    nrs = seccomp.notified_numbers(Profile(deny_syscalls=("ptrace",)))
    assert number("ptrace") in nrs and number("execve") in nrs and number("read") not in nrs


def test_syscall_table() -> None:
    assert number("read") == 0 and number("execve") == 59 and number("ptrace") == 101
    assert number("clone3") == 435 and number("openat2") == 437 and name(101) == "ptrace"
    assert name(9999) == "syscall_9999"
    for n in ("process_vm_readv", "process_vm_writev", "init_module", "finit_module",
              "delete_module", "kexec_load", "kexec_file_load", "mount", "umount2",
              "pivot_root", "fsopen", "fsmount", "move_mount", "open_tree", "bpf",
              "perf_event_open", "reboot", "swapon", "swapoff", "setns", "unshare",
              "userfaultfd", "open_by_handle_at", "iopl", "ioperm", "keyctl", "add_key",
              "request_key", "personality", "chroot", "acct", "quotactl", "syslog",
              "settimeofday", "clock_settime", "adjtimex"):
        number(n)
    with pytest.raises(ValueError, match="unknown x86_64 syscalls: nope, nada"):
        numbers(["read", "nope", "nada"])


def test_available_here() -> None:
    # this project's machines are x86_64 Linux >= 5.0: the monitor must be usable
    assert seccomp.available() is None
