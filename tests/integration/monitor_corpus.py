"""The corpus of misbehaving and benign programs (tests/corpus), run through a real Manager
under the shipped default policy: shared by the cgroup and the guest tests and the bench."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import os
import shutil
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hvtsm.lifecycle import Manager, ZoneRun
from hvtsm.policy import Policy, load_policy
from hvtsm.store import Store
from hvtsm.store.audit import zone_trail
from hvtsm.zones.base import Backend, WorkloadIO

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "corpus"
DEFAULT_POLICY = ROOT / "policies" / "default.toml"
#: the default policy's 10 minutes in 30 s: its network cut falls at 6 s
SCALE = 0.05
PYTHON = "/usr/bin/python3"
#: a world-readable private key where the default policy's "/home/*/.ssh/**" covers it
DECOY_HOME = Path("/home/hvtsm-decoy")
DECOY_KEY = DECOY_HOME / ".ssh" / "id_ed25519"


@dataclass(frozen=True)
class Case:
    program: str
    args: tuple[str, ...]
    #: anomaly categories that name the act (any of them); empty: benign
    expect: frozenset[str]
    #: for benign programs: a line their output must contain
    output: str = ""


def bad_cases(port: int) -> list[Case]:
    return [
        Case("cred_read.py", (str(DECOY_KEY),), frozenset({"sensitive-path"})),
        Case("reverse_shell.py", ("gateway", str(port)), frozenset({"reverse-shell"})),
        Case("unexpected_exec.py", (), frozenset({"unexpected-exec"})),
        Case("connect_out.py", ("gateway", str(port), "7"), frozenset({"connect-out"})),
        Case("fork_loop.py", (), frozenset({"fork-rate"})),
        Case("memory_hog.py", ("900",), frozenset({"memory-spike", "oom-kill"})),
        Case("ptrace_attach.py", (), frozenset({"denied-syscall"})),
        Case("module_load.py", (), frozenset({"denied-syscall"})),
        Case("mount_tmpfs.py", (), frozenset({"denied-syscall"})),
        Case("mem_inject.py", ("direct",), frozenset({"injection"})),
        Case("mem_inject.py", ("symlink",), frozenset({"injection"})),
        Case("mem_inject.py", ("reopen",), frozenset({"injection"})),
    ]


def benign_cases(port: int) -> list[Case]:
    return [
        Case("benign_compute.py", (), frozenset(), "OK compute"),
        Case("benign_tempfiles.py", (), frozenset(), "OK tempfiles"),
        Case("benign_children.py", (), frozenset(), "OK children apple,fig,pear hello 42"),
        Case("benign_early_net.py", ("gateway", str(port)), frozenset(), "OK early_net"),
    ]


def dropped_cases(port: int) -> list[Case]:
    """Code fetched from payload_server and run, in every shape dropped.py knows."""
    return [Case("dropped.py", (mode, "gateway", str(port)), frozenset({"dropped-code"}))
            for mode in DROPPED_MODES]


DROPPED_MODES = ("exec", "base64", "rename", "copy", "tar", "script-py", "pipe-sh", "preload",
                 "mmap", "memfd")
#: a library that does nothing when loaded (glibc keeps it as an empty compatibility stub)
HARMLESS_LIBRARY = Path("/lib/x86_64-linux-gnu/libutil.so.1")


def payloads() -> dict[str, bytes]:
    """What payload_server serves, by path."""
    true = Path("/bin/true").read_bytes()
    script = b"echo payload-ran\n"
    bundle = io.BytesIO()
    with tarfile.open(fileobj=bundle, mode="w") as tar:
        info = tarfile.TarInfo("script.sh")
        info.size, info.mode = len(script), 0o755
        tar.addfile(info, io.BytesIO(script))
    return {"/true": true, "/true.b64": base64.b64encode(true), "/script.sh": script,
            "/script.py": b"print('payload-ran')\n", "/lib.so": HARMLESS_LIBRARY.read_bytes(),
            "/bundle.tar": bundle.getvalue(),
            "/data.csv": b"".join(b"%d,%d\n" % (i, i * i) for i in range(200))}


@contextlib.contextmanager
def payload_server() -> Iterator[int]:
    """An HTTP server on all host addresses (a zone reaches it at its gateway) serving
    payloads(); yields its port."""
    served = payloads()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = served.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, format: str, *args: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def corpus_dir() -> Iterator[Path]:
    """The corpus copied where any user (and a guest over 9p) can read it."""
    base = Path(tempfile.mkdtemp(prefix="hvtsm-corpus-", dir="/var/tmp"))
    try:
        target = base / "corpus"
        shutil.copytree(CORPUS, target, ignore=shutil.ignore_patterns("__pycache__"))
        for path in [base, target, *target.iterdir()]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        yield target
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def decoy_key() -> Iterator[Path]:
    created = not DECOY_HOME.exists()
    (DECOY_KEY.parent).mkdir(parents=True, exist_ok=True)
    for d in (DECOY_HOME, DECOY_KEY.parent):
        os.chmod(d, 0o755)
    DECOY_KEY.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\ndecoy\n")
    os.chmod(DECOY_KEY, 0o644)
    try:
        yield DECOY_KEY
    finally:
        if created:
            shutil.rmtree(DECOY_HOME, ignore_errors=True)


@dataclass
class Outcome:
    run: ZoneRun
    output: str
    categories: list[str]
    evidence: list[dict]
    reactions: list[str]


def run_case(manager: Manager, store: Store, corpus: Path, case: Case, *,
             backend: Backend | None = None, timeout: float = 60,
             user: str = "nobody", policy: Policy | None = None) -> Outcome:
    policy = policy or load_policy(DEFAULT_POLICY)
    with tempfile.TemporaryFile() as out:
        io = WorkloadIO(stdin=None, stdout=out.fileno(), stderr=out.fileno())
        run = manager.launch(policy, [PYTHON, str(corpus / case.program), *case.args], io=io,
                             user=user, scale=SCALE, backend=backend)
        if not run.ended.wait(timeout):
            manager.terminate(run.zone_id, reason="test timeout")
            run.ended.wait(10)
        manager.settle()  # reactions run on their own thread: let the last one land
        out.seek(0)
        output = out.read().decode(errors="replace")
    with store.session() as session:
        trail = zone_trail(session, zone_id=run.zone_id)
    anomalies = [e for e in trail if e.kind == "anomaly"]
    return Outcome(run, output, [e.data["category"] for e in anomalies],
                   [e.data.get("evidence") or {} for e in anomalies],
                   [e.data["action"] for e in trail if e.kind == "reaction"])
