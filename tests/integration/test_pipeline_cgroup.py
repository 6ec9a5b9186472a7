"""A three-stage pipeline in real cgroup zones: fetch (network), parse (no network), compute.

The data flows only through the channels the pipeline policy grants; the parse zone cannot
reach the network even though the analysis missed its attempt; a channel the policy does
not grant is refused and audited.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cli_helpers import hvtsm, json_lines

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="cgroup zones need root"),
]

ROOT = Path(__file__).resolve().parents[2]
READINGS = ROOT / "tests" / "pipeline_samples" / "readings.py"
CSV = "sensor,value\na,1.5\nb,2.5\nc,5.0\n"


class Server:
    """HTTP on every host address (a zone reaches it only through its own NIC), and a UDP
    socket on the same port that must never hear from the parse zone."""

    def __init__(self) -> None:
        body = CSV.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                return

        self.http = http.server.ThreadingHTTPServer(("0.0.0.0", 0), Handler)
        self.port = self.http.server_address[1]
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("0.0.0.0", self.port))
        self.udp.settimeout(0.2)
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def datagrams(self) -> list[bytes]:
        got = []
        while True:
            try:
                got.append(self.udp.recv(2048))
            except TimeoutError:
                return got

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.udp.close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def test_three_stage_pipeline(tmp_path: Path, server: Server) -> None:
    db_path = tmp_path / "hvtsm.db"
    db = f"sqlite:///{db_path}"
    result = hvtsm(db, "pipeline", "--json", str(READINGS), "--", str(server.port),
                   timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout
    lines = json_lines(result.stdout)
    final = lines[-1]
    assert final["event"] == "pipeline" and final["ok"], final
    summary = json.loads(final["output"])
    # the data went fetch -> parse -> compute intact
    assert summary["count"] == 3 and summary["mean"] == 3.0 and summary["max"] == 5.0
    # the parse zone has no NIC: its hidden datagram never left (ENETUNREACH)
    assert summary["parse_network"] == "unreachable (errno 101)"
    assert server.datagrams() == []
    # compute -> fetch is not granted
    assert summary["leak"].startswith("refused")

    stages = {s["name"]: s for s in final["stages"]}
    assert list(stages) == ["fetch", "parse", "compute"]
    zone_ids = {name: s["zone"] for name, s in stages.items()}
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute("SELECT id, name, group_id, kind, policy_name, applied FROM zone"
                            ).fetchall()
        by_name = {r[1]: r for r in rows}
        assert {r[2] for r in rows} == {final["group"]}
        assert {r[3] for r in rows} == {"segment"}
        assert by_name["parse"][4] == "segment-parse"
        assert json.loads(by_name["parse"][5])["network"] == "none"
        assert json.loads(by_name["fetch"][5])["network"] in ("full", "none")
        messages = conn.execute(
            "SELECT sender_zone, receiver_name, size, digest, verdict, content "
            "FROM channel_message ORDER BY id").fetchall()
    delivered = [(m[0], m[1]) for m in messages if m[4] == "delivered"]
    assert (zone_ids["fetch"], "parse") in delivered
    assert (zone_ids["parse"], "compute") in delivered
    refused = [m for m in messages if m[4] == "refused"]
    assert len(refused) == 1
    sender, receiver, size, digest, _verdict, content = refused[0]
    assert (sender, receiver, size) == (zone_ids["compute"], "fetch", 4)
    assert digest == hashlib.sha256(b"leak").hexdigest()
    assert content is None  # the policy does not ask for content
    # the operator sees the refusal in the compute zone's audit trail
    trail = json_lines(hvtsm(db, "audit", zone_ids["compute"], "--json", check=True).stdout)
    assert any("fetch" in json.dumps(e) and "refused" in json.dumps(e) for e in trail)


def test_a_failing_stage_stops_the_pipeline(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'hvtsm.db'}"
    # port 9 (discard) on the zone's gateway has no listener: fetch fails, nothing follows
    result = hvtsm(db, "pipeline", "--json", str(READINGS), "--", "9", timeout=120)
    assert result.returncode == 1, result.stderr
    final = json_lines(result.stdout)[-1]
    assert not final["ok"] and final["skipped"] == ["parse", "compute"]
    assert final["stages"][0]["name"] == "fetch"
    assert "ConnectionRefusedError" in final["stages"][0]["stderr"] or \
        "Connection refused" in final["stages"][0]["stderr"]


def test_a_module_beside_the_program_runs_in_the_zones(tmp_path: Path) -> None:
    """The stages import a module of the program's directory: the analysis reads it (parse
    is a parse stage because of the helper's json.loads), the snapshot ships it."""
    (tmp_path / "stats_helpers.py").write_text(
        "import json\n"
        "def decode(text):\n    return json.loads(text)\n"
        "def mean(values):\n    return sum(values) / len(values)\n")
    program = tmp_path / "stats.py"
    program.write_text("import stats_helpers\n"
                       "def parse(text):\n    return stats_helpers.decode(text)\n"
                       "def compute(values):\n    return {'mean': stats_helpers.mean(values)}\n"
                       "def main(text):\n    a = parse(text)\n    return compute(a)\n")
    db = f"sqlite:///{tmp_path / 'hvtsm.db'}"
    plan = json.loads(hvtsm(db, "pipeline", "--plan", "--json", str(program), "--", "[1]",
                            check=True).stdout)
    assert [s["role"] for s in plan["stages"]] == ["parse", "compute"]
    result = hvtsm(db, "pipeline", "--json", str(program), "--", "[1, 2, 6]", timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout
    final = json_lines(result.stdout)[-1]
    assert final["ok"] and json.loads(final["output"]) == {"mean": 3.0}, final
