"""Output is bounded whatever a workload writes: `hvtsm run --json` output events of at most
MAX_OUTPUT_EVENT bytes (a longer line split, every piece but the last "partial"), the
controller's memory flat under a line of hundreds of megabytes, and a pipeline stage's
output kept up to MAX_OUTPUT with the rest counted."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

import pytest

from hvtsm.cli import pipeline_cmd, run_cmd
from hvtsm.limits import MAX_OUTPUT, MAX_OUTPUT_EVENT
from hvtsm.pipeline.runner import Kept, PipelineResult, StageResult, _drain

ROOT = Path(__file__).resolve().parents[2]
M = MAX_OUTPUT_EVENT


def relayed(data: bytes, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    monkeypatch.setattr(run_cmd, "emit_json",
                        lambda event, ts, **fields: events.append({"event": event, **fields}))
    r, w = os.pipe()

    def write() -> None:
        with os.fdopen(w, "wb") as f:
            for i in range(0, len(data), 100_000):  # pieces that do not align with events
                f.write(data[i:i + 100_000])
                f.flush()

    writer = threading.Thread(target=write)
    writer.start()
    run_cmd._relay("z1", "stdout", os.fdopen(r, "rb"))
    writer.join()
    return events


@pytest.mark.parametrize("data", [
    b"one\ntwo\n", b"no newline at the end", b"x" * M, b"x" * M + b"\n", b"x" * (M + 1),
    b"x" * (3 * M + 5) + b"\nnext\n", "\u00e9\u20ac\U0001f600".encode() * (M // 3),
    b"\n" * 1000, b"\xff\xfe" * M,
], ids=["lines", "no-newline", "exactly", "exactly+nl", "one-more", "long", "utf8", "empty-lines",
        "invalid-utf8"])
def test_output_events_are_bounded_and_split_long_lines(
        data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    events = relayed(data, monkeypatch)
    assert "".join(e["data"] for e in events) == data.decode("utf-8", errors="replace")
    for event in events:
        assert event["event"] == "output" and event["stream"] == "stdout"
        assert len(event["data"].encode("utf-8", "surrogatepass")) <= 3 * M  # U+FFFD is 3 B
        if event.get("partial"):
            assert not event["data"].endswith("\n")
        else:
            assert "partial" not in event
    # a line ends an event, and only the last event of a line lacks "partial"
    ends = [e for e in events if not e.get("partial")]
    assert len(ends) == data.count(b"\n") + (not data.endswith(b"\n"))


def test_valid_utf8_is_never_split_inside_a_character(monkeypatch: pytest.MonkeyPatch) -> None:
    data = "\U0001f600".encode() * M  # 4 bytes each: no event boundary falls between them
    events = relayed(data, monkeypatch)
    assert len(events) > 3
    for event in events:
        assert "\ufffd" not in event["data"]
        assert len(event["data"].encode()) <= M


def test_a_line_of_hundreds_of_megabytes_keeps_the_controller_small() -> None:
    # the issue: 500 MB without a newline took the controller to 2.9 GiB
    script = f"""
import resource, subprocess, sys
sys.path.insert(0, {str(ROOT)!r})
from hvtsm.cli.run_cmd import _relay
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
writer = subprocess.Popen("head -c {200 << 20} /dev/zero | tr '\\\\0' x", shell=True,
                          stdout=subprocess.PIPE)
_relay("z1", "stdout", writer.stdout)
writer.wait()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before, after, file=sys.stderr)
"""
    proc = subprocess.run([sys.executable, "-c", script], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=120, check=True)
    before, after = map(int, proc.stderr.split()[-2:])
    assert (after - before) * 1024 < 32 * 1024 * 1024, proc.stderr  # KiB: flat, not 200 MB


def test_a_stage_keeps_at_most_its_limit_and_counts_the_rest() -> None:
    kept = Kept(limit=1000)
    r, w = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(w, b"y" * 300_000), os.close(w)))
    writer.start()
    _drain(r, kept)
    writer.join()
    assert bytes(kept.data) == b"y" * 1000 and kept.dropped == 299_000
    assert Kept().limit == MAX_OUTPUT


def test_a_cut_stage_output_is_said() -> None:
    stage = StageResult("fetch", "z1", "exited", 0, None, b"", "workload exited",
                        {"stderr": 123})
    result = PipelineResult("g1", [stage])
    err = io.StringIO()
    with redirect_stderr(err):
        pipeline_cmd._print_result(result, json_mode=False)
    assert "stage fetch: its stderr was cut at 4MiB (123 more bytes read and dropped)" in \
        err.getvalue()
    assert result.to_dict()["stages"][0]["truncated"] == {"stderr": 123}
