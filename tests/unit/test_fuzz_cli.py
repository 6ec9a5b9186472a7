"""Property-based fuzz of the CLI with hostile files: `policy validate`, `policy show`,
`analyze`, `run --policy`, `invoke`, `pipeline` (program, manifest, policy) given a FIFO,
/dev/zero, a directory, a socket, files beyond every size limit, deep nesting or binary
junk. Each answers within seconds with exit status 1 or 125 and an `hvtsm: error:` line
naming the file: no traceback, no hang, no zone made."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from hvtsm import limits
from hvtsm.cli.main import main

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = ROOT / "tests" / "pipeline_samples" / "readings.py"
#: per example: in-process, a refusal takes milliseconds; a hang would take forever
DEADLINE = timedelta(seconds=5)


def _fifo(path: Path, _data: bytes) -> None:
    os.mkfifo(path)


def _sparse(size: int, head: bytes = b"") -> Callable[[Path, bytes], None]:
    def make(path: Path, _data: bytes) -> None:
        with path.open("wb") as f:
            f.write(head)
            f.truncate(size)  # no time spent writing
    return make


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _deep(path: Path, data: bytes) -> None:
    depth = 1000 + len(data) * 50
    path.write_text('name = "x"\nx = ' + "[" * depth + "]" * depth + "\n")


#: kind -> how to make a file of that kind at a path (given some random bytes)
KINDS: dict[str, Callable[[Path, bytes], None]] = {
    "fifo": _fifo,
    "dev-zero": lambda path, _d: path.symlink_to("/dev/zero"),
    "directory": lambda path, _d: path.mkdir(),
    "huge-policy": _sparse(limits.MAX_POLICY_BYTES + 1),
    "huge-source": _sparse(limits.MAX_SOURCE_BYTES + 1, b"#!/bin/sh\n"),
    "huge-elf": _sparse(limits.MAX_BINARY_BYTES + 1, b"\x7fELF"),
    "junk": _write,
    "empty": lambda path, _d: path.write_bytes(b""),
    "deep": _deep,
    "missing": lambda _path, _d: None,
}


@contextlib.contextmanager
def hostile(kind: str, data: bytes) -> Iterator[tuple[Path, Path]]:
    """(the hostile file, a directory for the store) in a fresh temporary directory."""
    with tempfile.TemporaryDirectory(prefix="hvtsm-fuzz-") as tmp:
        path = Path(tmp) / "input"
        KINDS[kind](path, data)
        yield path, Path(tmp)


def commands(path: Path, db: str) -> dict[str, tuple[list[str], set[int]]]:
    """name -> (argv, the exit statuses it may answer with)."""
    file = str(path)
    return {
        "policy validate": (["policy", "validate", file], {1}),
        "policy show": (["policy", "show", file], {125}),
        "analyze": (["analyze", file], {1}),
        "run": (["--db", db, "run", "--policy", file, "--", "true"], {125}),
        "pipeline": (["--db", db, "pipeline", file], {1}),
        "pipeline --manifest": (["--db", db, "pipeline", "--manifest", file], {1}),
        "pipeline --policy": (["--db", db, "pipeline", "--policy", file, str(PROGRAM)], {1}),
        "invoke": (["--db", db, "invoke", file, "--store-only"], {125}),
    }


def answer(argv: list[str]) -> tuple[int, str, float]:
    err, out = io.StringIO(), io.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        status = main(argv)
    return status, err.getvalue(), time.monotonic() - started


def refused(kind: str, data: bytes, command: str) -> None:
    with hostile(kind, data) as (path, tmp):
        db_file = tmp / "store.db"
        argv, statuses = commands(path, f"sqlite:///{db_file}")[command]
        status, err, took = answer(argv)
        assert status in statuses, (command, kind, status, err)
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if line.startswith("hvtsm: error:")]
        assert lines, err
        assert str(path) in lines[0], lines[0]
        assert took < 3, f"{command} on {kind}: {took:.1f}s"
        if command == "run":
            assert not db_file.exists()  # refused before any store, cgroup or zone


#: file kinds no command can use (the deep TOML and the sparse files are no program either)
UNUSABLE = ("fifo", "dev-zero", "directory", "huge-policy", "huge-source", "huge-elf", "deep",
            "missing")


@hypothesis.settings(deadline=DEADLINE, max_examples=60)
@hypothesis.given(kind=st.sampled_from(UNUSABLE),
                  command=st.sampled_from(["policy validate", "policy show", "analyze", "run",
                                           "pipeline", "pipeline --manifest",
                                           "pipeline --policy", "invoke"]),
                  data=st.binary(max_size=64))
def test_unusable_files_are_refused_by_every_command(kind: str, command: str,
                                                     data: bytes) -> None:
    refused(kind, data, command)


@hypothesis.settings(deadline=DEADLINE, max_examples=60)
@hypothesis.given(kind=st.sampled_from(["junk", "empty"]),
                  command=st.sampled_from(["policy validate", "policy show", "run",
                                           "pipeline --manifest", "pipeline --policy",
                                           "analyze", "pipeline"]),
                  data=st.binary(min_size=1, max_size=2048))
def test_junk_is_refused_as_what_it_is(kind: str, command: str, data: bytes) -> None:
    # a policy or a manifest needs a name / segments; a program needs a known format
    refused(kind, data, command)


@hypothesis.settings(deadline=DEADLINE, max_examples=40)
@hypothesis.given(text=st.sampled_from([
    'name = "x"\n[[phase]]\nat = "0s"\ncpus = "0-99999999"\n',
    'name = "x"\n[[phase]]\nat = "0s"\nmemory = "99999999999999999999TiB"\n',
    'name = "x"\n[[phase]]\nat = "0s"\npids = 9\n[[phase]]\nat = "99999999h"\n'
    'action = "terminate"\n',
    'name = "x"\n[[phase]]\nat = "0s"\npids = 9\n[anomaly]\nfactor = nan\n',
    'name = "x"\n[[phase]]\nat = "0s"\npids = 9\n[anomaly]\nsensitive_paths = ["'
    + "/**" * 2000 + '"]\n',
    'name = "x"\n[[phase]]\nat = "0s"\negress = ['
    + ", ".join(f'"10.0.{i // 256 % 256}.{i % 256}:80"' for i in range(10_000)) + "]\n",
]), command=st.sampled_from(["policy validate", "policy show", "run", "pipeline --policy"]))
def test_policies_no_zone_can_use_are_refused(text: str, command: str) -> None:
    with tempfile.TemporaryDirectory(prefix="hvtsm-fuzz-") as tmp:
        path = Path(tmp) / "bad.toml"
        path.write_text(text)
        argv, statuses = commands(path, f"sqlite:///{tmp}/store.db")[command]
        status, err, took = answer(argv)
        assert status in statuses and "Traceback" not in err, err
        assert any(line.startswith("hvtsm: error:") and str(path) in line
                   for line in err.splitlines()), err
        assert took < 3
        assert not (Path(tmp) / "store.db").exists()


# --- the same, as real processes: no traceback, no hang, exit status and message -----------

@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    os.mkfifo(path)
    return path


def hvtsm(*argv: str) -> tuple[int, str, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "hvtsm.cli.main", *argv], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60)
    return proc.returncode, proc.stderr, time.monotonic() - started


def test_a_fifo_as_policy_makes_no_zone(fifo: Path, tmp_path: Path) -> None:
    status, err, took = hvtsm("--db", f"sqlite:///{tmp_path}/store.db", "run", "--policy",
                              str(fifo), "--", "true")
    assert status == 125 and "Traceback" not in err
    assert f"hvtsm: error: {fifo}: is a FIFO (named pipe), not a regular file" in err
    assert took < 15  # the interpreter's start and imports, nothing waiting on the FIFO
    assert not (tmp_path / "store.db").exists()


def test_analyze_dev_zero_and_a_socket(tmp_path: Path) -> None:
    status, err, _ = hvtsm("analyze", "/dev/zero")
    assert status == 1 and "hvtsm: error: /dev/zero: is a character device" in err
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    try:
        status, err, _ = hvtsm("policy", "validate", str(tmp_path / "sock"))
    finally:
        sock.close()
    assert status == 1 and f"{tmp_path / 'sock'}: is a socket" in err
    assert "Traceback" not in err
