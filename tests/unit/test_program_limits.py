"""Programs and manifests a user names (`hvtsm analyze`, `invoke`, `pipeline`): a regular
file of bounded size, or a clear error naming it, refused from its stat before anything is
read (a FIFO never opens for reading, /dev/zero never ends)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hvtsm import limits
from hvtsm.analysis import analyze
from hvtsm.errors import AnalysisError, HvtsmError, PipelineError
from hvtsm.files import FileRefused, read_regular
from hvtsm.invoke.code import analyze_bytes
from hvtsm.pipeline.plan import plan_manifest, plan_python
from hvtsm.policy.catalog import load_referenced


def within(seconds: float, call: Callable[[], object]) -> BaseException | None:
    caught: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # handed to the test
            caught.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds}s"
    return caught[0] if caught else None


def sparse(path: Path, size: int, head: bytes = b"") -> Path:
    with path.open("wb") as f:
        f.write(head)
        f.truncate(size)
    return path


@pytest.fixture
def unusable(tmp_path: Path) -> Iterator[dict[str, Path]]:
    fifo = tmp_path / "prog.py"
    os.mkfifo(fifo)
    directory = tmp_path / "dir.py"
    directory.mkdir()
    sock_path = tmp_path / "sock.py"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    link = tmp_path / "zero.py"
    link.symlink_to("/dev/zero")
    try:
        yield {
            "a FIFO": fifo, "a directory": directory, "a socket": sock_path,
            "a character device": link,
            "a script to analyze may be at most 4MiB": sparse(
                tmp_path / "big.sh", limits.MAX_SOURCE_BYTES + 1, b"#!/bin/sh\n"),
            "at most 128MiB": sparse(tmp_path / "big.elf", limits.MAX_BINARY_BYTES + 1,
                                     b"\x7fELF"),
        }
    finally:
        sock.close()


def test_analyze_refuses_what_is_no_program_file(unusable: dict[str, Path]) -> None:
    for says, path in unusable.items():
        err = within(2, lambda path=path: analyze(path))  # type: ignore[misc]
        assert isinstance(err, AnalysisError), (says, err)
        assert err.file == str(path) and says in str(err), str(err)


def test_pipeline_refuses_them_too(unusable: dict[str, Path]) -> None:
    policy = load_referenced("pipeline", beside=None, field="policy")
    for says, path in unusable.items():
        err = within(2, lambda path=path: plan_python(path, policy))  # type: ignore[misc]
        assert isinstance(err, AnalysisError) and says in str(err), (says, err)
        err = within(2, lambda path=path: plan_manifest(path, policy))  # type: ignore[misc]
        assert isinstance(err, PipelineError) and str(path) in str(err), (says, err)


def test_a_huge_local_module_is_refused(tmp_path: Path) -> None:
    sparse(tmp_path / "helpers.py", limits.MAX_SOURCE_BYTES + 1)
    (tmp_path / "job.py").write_text("import helpers\n")
    with pytest.raises(AnalysisError, match="at most 4MiB") as info:
        analyze(tmp_path / "job.py")
    assert info.value.file == str(tmp_path / "helpers.py")


def test_a_manifest_of_any_shape_is_answered(tmp_path: Path) -> None:
    policy = load_referenced("pipeline", beside=None, field="policy")
    deep = tmp_path / "deep.toml"
    deep.write_text('name = "m"\nx = ' + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(PipelineError, match="nested too deeply"):
        plan_manifest(deep, policy)
    many = tmp_path / "many.toml"
    many.write_text("".join(f'[[segment]]\nname = "s{i}"\ncommand = ["true"]\n'
                            for i in range(limits.MAX_SEGMENTS + 1)))
    with pytest.raises(PipelineError, match=f"at most {limits.MAX_SEGMENTS}") as info:
        plan_manifest(many, policy)
    assert info.value.field == "segment"
    huge = sparse(tmp_path / "huge.toml", limits.MAX_MANIFEST_BYTES + 1)
    with pytest.raises(PipelineError, match="at most 1MiB"):
        plan_manifest(huge, policy)


def test_stored_code_errors_name_the_file_given() -> None:
    with pytest.raises(AnalysisError) as info:
        analyze_bytes(b"\x00\x01 junk", "/home/ann/tool")
    assert info.value.file == "/home/ann/tool"


def test_the_reader_refuses_a_file_that_grows(tmp_path: Path) -> None:
    path = tmp_path / "grows"
    path.write_bytes(b"x" * 10)
    assert read_regular(path, 10) == b"x" * 10
    path.write_bytes(b"x" * 11)
    with pytest.raises(FileRefused, match="at most 10B"):
        read_regular(path, 10)
    assert issubclass(FileRefused, ValueError) and not issubclass(FileRefused, HvtsmError)


def test_an_elf_within_the_limit_is_still_read() -> None:
    started = time.monotonic()
    report = analyze("/bin/true")
    assert report.language == "elf" and time.monotonic() - started < 2


def test_log_tails_are_read_from_the_end(tmp_path: Path) -> None:
    from hvtsm.files import read_tail

    log = sparse(tmp_path / "console.log", 50 * 1024 * 1024)
    with log.open("ab") as f:
        f.write(b"last words\n")
    assert read_tail(log, 11) == b"last words\n"
