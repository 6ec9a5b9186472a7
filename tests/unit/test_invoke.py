"""The invoke plan (runtime, command line, lifespan scale, expected programs) and the code
store, on real analyses and a real SQLite store."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvtsm.errors import AnalysisError, InvokeError
from hvtsm.invoke.code import code_id, get_code, put_code, safe_name
from hvtsm.invoke.plan import command, exec_targets, lifespan_scale, runtime_for
from hvtsm.policy import parse_policy
from hvtsm.store import Store

SCRIPT = b"""#!/bin/sh
set -e
curl -s http://192.0.2.1/x > /tmp/x
jq . /tmp/x | tee out.json
rm -f /tmp/x
"""
PY = b"import socket\n\ndef fetch():\n    return socket.create_connection(('192.0.2.1', 80))\n"
POLICY = b"""
name = "seg"
[[phase]]
at = "0s"
network = "full"
[[phase]]
at = "10s"
action = "terminate"
[[segment]]
match = { capability = "network" }
lifespan_scale = 0.5
[[segment]]
match = { capability = "file-write" }
lifespan_scale = 0.25
"""


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'code.db'}")


def test_code_is_stored_once_by_content(store: Store) -> None:
    row, report = put_code(store, SCRIPT, "fetch.sh")
    assert row.id == code_id(SCRIPT) and row.language == "shell" and row.name == "fetch.sh"
    again, _ = put_code(store, SCRIPT, "other-name.sh")
    assert again.id == row.id and again.name == "fetch.sh"
    assert get_code(store, row.id[:10]).data == SCRIPT
    assert report.language == "shell"
    with pytest.raises(InvokeError, match="no stored code"):
        get_code(store, "0" * 64)
    with pytest.raises(InvokeError, match="not a code id"):
        get_code(store, "../etc")


def test_unreadable_code_is_not_stored(store: Store) -> None:
    with pytest.raises(AnalysisError):
        put_code(store, b"\x00\x01binary junk", "junk")
    with pytest.raises(AnalysisError):
        put_code(store, b"def broken(:\n", "bad.py")


def test_safe_names() -> None:
    assert safe_name("../../etc/passwd") == "passwd"
    assert safe_name("a b$c.py") == "a_b_c.py"
    assert safe_name(None, "python") == "program.py"
    assert safe_name(".hidden") == "hidden"


def test_runtime_and_command(store: Store) -> None:
    _, shell = put_code(store, SCRIPT, "fetch.sh")
    _, py = put_code(store, PY, "fetch.py")
    assert runtime_for(shell) == "sh" and runtime_for(py) == "python3"
    assert runtime_for(py, "sh") == "sh"
    with pytest.raises(InvokeError, match="unknown runtime"):
        runtime_for(py, "ruby")
    assert command("sh", "/c/fetch.sh", ["a"]) == ["/bin/sh", "/c/fetch.sh", "a"]
    assert command("native", "/c/prog", []) == ["/c/prog"]
    assert command("python3", "/c/x.py", [], python="/usr/local/bin/python3")[0] == \
        "/usr/local/bin/python3"


def test_lifespan_scale_takes_the_smallest_match(store: Store) -> None:
    policy = parse_policy(POLICY, source="seg.toml")
    _, shell = put_code(store, SCRIPT, "fetch.sh")  # network and file-write
    _, py = put_code(store, PY, "fetch.py")  # network only (in fetch())
    plain, _ = put_code(store, b"print(1)\n", "plain.py")
    assert lifespan_scale(policy, shell) == 0.25
    assert lifespan_scale(policy, py) == 0.5
    _, report = put_code(store, b"print(1)\n", "plain.py")
    assert plain.language == "python" and lifespan_scale(policy, report) == 1.0


def test_exec_targets_of_a_script(store: Store) -> None:
    _, shell = put_code(store, SCRIPT, "fetch.sh")
    assert exec_targets(shell) == ("curl", "jq", "rm", "tee")
    _, py = put_code(store, PY, "fetch.py")
    assert exec_targets(py) == ()


def test_exec_targets_look_past_exec(store: Store) -> None:
    _, shell = put_code(store, b"#!/bin/sh\nexec nohup wget -q http://192.0.2.1/\n", "w.sh")
    assert exec_targets(shell) == ("wget",)
