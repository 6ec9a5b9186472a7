"""The wire protocol (guest_agent/protocol.py): framing, limits, validation, seq tracking."""

from __future__ import annotations

import json
from typing import Any

import pytest

from guest_agent import protocol as p
from guest_agent.protocol import (
    AGENT_TYPES,
    HOST_TYPES,
    MAX_MESSAGE_BYTES,
    Decoder,
    ProtocolError,
    SeqTracker,
    decode,
    encode,
    output_messages,
    validate,
)

SAMPLES: dict[str, dict[str, Any]] = {
    "hello": {"type": "hello", "seq": 0, "protocol": 1, "agent_version": "0.1.0",
              "capabilities": ["start", "probe:meminfo"], "pid": 42, "kernel": "6.1.0",
              "python": "3.9.18", "boot_ms": 5123, "heartbeat": 1.0, "hostname": "g",
              "port": "/dev/vport1p1", "workloads": [{"id": "w1", "pid": 77}]},
    "heartbeat": {"type": "heartbeat", "seq": 1, "uptime": 12.5, "dropped": 0, "queued": 0},
    "started": {"type": "started", "seq": 2, "id": "w1", "pid": 77,
                "standby": {"used": True, "id": "sb-g1", "pid": 77, "prepared": 1.7e9}},
    "standby_ready": {"type": "standby_ready", "seq": 3, "id": "sb-g1", "pid": 77,
                      "prepared": 1.7e9, "mode": "python"},
    "standby": {"type": "standby", "id": "sb-g1", "mode": "exec", "program": "/bin/sh",
                "python": "/usr/bin/python3", "user": "nobody",
                "monitor": {"deny_syscalls": ["ptrace"]}},
    "output": {"type": "output", "seq": 3, "id": "w1", "stream": "stderr",
               "data": "héllo\x00\n"},
    "exit": {"type": "exit", "seq": 4, "id": "w1", "status": -9},
    "probe_result": {"type": "probe_result", "seq": 5, "id": "p1", "ok": True,
                     "result": {"MemTotal": 1024}},
    "error": {"type": "error", "seq": 6, "message": "no", "id": "w9", "kind": "invalid"},
    "event": {"type": "event", "seq": 7, "kind": "syscall", "id": "w1", "time": 1.5,
              "data": {"nr": 42}},
    "start": {"type": "start", "id": "w1", "argv": ["sh", "-c", "true"],
              "env": {"A": "b"}, "cwd": "/", "user": "nobody", "stdout": "stream",
              "stderr": "stdout"},
    "signal": {"type": "signal", "id": "w1", "signal": 15},
    "probe": {"type": "probe", "id": "p1", "kind": "tcp_connect",
              "args": {"host": "127.0.0.1", "port": 80}},
    "ping": {"type": "ping", "id": "k1", "hello": True},
    "profile": {"type": "profile", "id": "w1", "monitor": {"network": "none"}},
    "transient": {"type": "transient", "id": "w1", "op": "split", "hold": 3, "zone": "zt1",
                  "cgroup": "zt1", "limits": {"memory": 1 << 26}, "network": "none"},
    "channel_send": {"type": "channel_send", "seq": 8, "id": "m1", "to": "parse", "size": 3,
                     "offset": 0, "data": "YWJj"},
    "channel_ack": {"type": "channel_ack", "seq": 9, "id": "d1"},
    "channel_deliver": {"type": "channel_deliver", "id": "d1", "from": "fetch", "size": 3,
                        "offset": 0, "data": "YWJj"},
    "channel_verdict": {"type": "channel_verdict", "id": "m1", "verdict": "refused",
                        "reason": "no channel from fetch to parse is granted"},
    "admin": {"type": "admin", "id": "a1", "op": "scrub", "uid": 65534, "gid": 65534,
              "scratch": "/var/tmp/hvtsm-scratch", "shared": ["/tmp", "/var/tmp", "/dev/shm"],
              "private": ["/tmp", "/var/tmp"]},
    "admin_result": {"type": "admin_result", "seq": 10, "id": "a1", "op": "scrub", "ok": True,
                     "killed": 3, "deleted": 2, "rounds": 1, "seconds": 0.052},
    "deputy": {"type": "deputy", "id": "z1", "in_force": 0, "grace": 0.3,
               "lock": "/sys/fs/cgroup/memory/hvtsm/z1",
               "phases": [{"index": 1, "due": 1.7e9, "terminate": False, "steps": [
                   {"op": "lower", "path": "/sys/fs/cgroup/memory/hvtsm/z1/memory.max",
                    "value": 268435456}]}],
               "fail_closed": [{"op": "kill", "procs": ["/sys/fs/cgroup/hvtsm/z1/cgroup.procs"],
                                "version": 2, "kill": "/sys/fs/cgroup/hvtsm/z1/cgroup.kill"}]},
    "deputy_ack": {"type": "deputy_ack", "id": "z1", "seq": 3, "thaw": True},
}


def test_every_type_has_a_sample() -> None:
    assert set(SAMPLES) == set(AGENT_TYPES | HOST_TYPES) == set(p.SCHEMAS)


@pytest.mark.parametrize("mtype", sorted(SAMPLES))
def test_round_trip(mtype: str) -> None:
    line = encode(SAMPLES[mtype])
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode(line) == SAMPLES[mtype]
    assert Decoder().feed(line) == [SAMPLES[mtype]]


def test_minimal_messages_validate() -> None:
    assert validate({"type": "ping"}) is None
    assert validate({"type": "probe_result", "seq": 0, "id": "p", "ok": False,
                     "error": "x"}) is None


def test_decoder_splits_any_way() -> None:
    stream = b"".join(encode(SAMPLES[t]) for t in sorted(SAMPLES))
    whole = Decoder().feed(stream)
    assert whole == [SAMPLES[t] for t in sorted(SAMPLES)]
    dec = Decoder()
    bytewise = [item for i in range(len(stream)) for item in dec.feed(stream[i:i + 1])]
    assert bytewise == whole
    assert dec.buffered == 0


def test_blank_lines_and_crlf_are_fine() -> None:
    assert Decoder().feed(b"\n\n  \n" + encode(SAMPLES["ping"])[:-1] + b"\r\n") == [
        SAMPLES["ping"]]


def test_encode_refuses_oversized_and_invalid() -> None:
    big = {"type": "output", "seq": 1, "id": "w", "stream": "stdout",
           "data": "x" * MAX_MESSAGE_BYTES}
    with pytest.raises(ProtocolError) as info:
        encode(big)
    assert info.value.kind == p.OVERSIZED and info.value.size > MAX_MESSAGE_BYTES
    with pytest.raises(ProtocolError) as info:
        encode({"type": "exit", "seq": 1, "id": "w"})
    assert info.value.kind == p.INVALID and "status" in info.value.detail
    with pytest.raises(ProtocolError):
        encode({"type": "heartbeat", "seq": 1, "uptime": float("nan")})


def _line_of(size: int) -> bytes:
    """A valid output message whose encoded line is exactly `size` bytes."""
    base = encode({"type": "output", "seq": 1, "id": "w", "stream": "stdout", "data": ""})
    return encode({"type": "output", "seq": 1, "id": "w", "stream": "stdout",
                   "data": "x" * (size - len(base))})


def test_limit_is_exact() -> None:
    at_limit = _line_of(MAX_MESSAGE_BYTES)
    assert len(at_limit) == MAX_MESSAGE_BYTES
    assert Decoder().feed(at_limit)[0]["type"] == "output"
    over = at_limit[:-1] + b"x\n"
    out = Decoder().feed(over)
    assert len(out) == 1 and isinstance(out[0], ProtocolError) and out[0].kind == p.OVERSIZED


@pytest.mark.parametrize("piece", [1 << 20, 4096, 1000])
def test_oversized_line_is_discarded_reported_once_and_the_stream_goes_on(piece: int) -> None:
    ping = encode(SAMPLES["ping"])
    stream = ping + b"A" * (3 * MAX_MESSAGE_BYTES) + b"\n" + ping
    dec = Decoder()
    out: list[Any] = []
    for i in range(0, len(stream), piece):
        out += dec.feed(stream[i:i + piece])
        assert dec.buffered <= MAX_MESSAGE_BYTES  # never buffered without bound
    assert out[0] == SAMPLES["ping"] and out[-1] == SAMPLES["ping"]
    errors = [o for o in out if isinstance(o, ProtocolError)]
    assert len(out) == 3 and len(errors) == 1
    assert errors[0].kind == p.OVERSIZED and errors[0].excerpt.startswith("AAAA")


@pytest.mark.parametrize(("line", "kind", "words"), [
    (b"not json", p.MALFORMED, "not JSON"),
    (b"[1, 2]", p.MALFORMED, "JSON object"),
    (b'{"seq": 1}', p.MALFORMED, "type"),
    (b"\xff\xfe{}", p.MALFORMED, "UTF-8"),
    (b'{"type": "heartbeat", "seq": 1, "uptime": NaN}', p.MALFORMED, "NaN"),
    (b'{"type": "launch_missiles", "seq": 1}', p.UNKNOWN_TYPE, "launch_missiles"),
    (b'{"type": "exit", "seq": 1, "id": "w"}', p.INVALID, "lacks field 'status'"),
    (b'{"type": "exit", "seq": 1, "id": "w", "status": "3"}', p.INVALID, "integer"),
    (b'{"type": "exit", "seq": 1, "id": "w", "status": true}', p.INVALID, "integer"),
    (b'{"type": "exit", "seq": -1, "id": "w", "status": 0}', p.INVALID, "seq"),
    (b'{"type": "exit", "seq": 1, "id": "", "status": 0}', p.INVALID, "non-empty"),
    (b'{"type": "output", "seq": 1, "id": "w", "stream": "stdin", "data": ""}', p.INVALID,
     "stdout"),
    (b'{"type": "probe_result", "seq": 1, "id": "p", "ok": true}', p.INVALID, "result"),
    (b'{"type": "probe_result", "seq": 1, "id": "p", "ok": false}', p.INVALID, "error"),
    (b'{"type": "hello", "seq": 0, "protocol": 1}', p.INVALID, "agent_version"),
    (b'{"type": "start", "id": "w", "argv": ["x"], "stderr": "tty"}', p.INVALID, "discard"),
    (b"[" * 100000 + b"]" * 100000, p.OVERSIZED, "line"),
])
def test_malformed_lines_become_typed_errors(line: bytes, kind: str, words: str) -> None:
    out = Decoder().feed(line + b"\n")
    assert len(out) == 1 and isinstance(out[0], ProtocolError), out
    assert out[0].kind == kind and words in str(out[0]), out[0]


def test_deep_nesting_is_malformed_not_a_crash() -> None:
    line = b"[" * 30000 + b"]" * 30000 + b"\n"
    assert len(line) < MAX_MESSAGE_BYTES
    (err,) = Decoder().feed(line)
    assert isinstance(err, ProtocolError) and err.kind == p.MALFORMED


def test_direction_is_enforced() -> None:
    agent_side = Decoder(HOST_TYPES)
    (err,) = agent_side.feed(encode(SAMPLES["hello"]))
    assert isinstance(err, ProtocolError) and err.kind == p.UNKNOWN_TYPE
    host_side = Decoder(AGENT_TYPES)
    (err,) = host_side.feed(encode(SAMPLES["start"]))
    assert isinstance(err, ProtocolError) and err.kind == p.UNKNOWN_TYPE


def test_errors_keep_the_id_to_answer_to() -> None:
    (err,) = Decoder(HOST_TYPES).feed(b'{"type": "start", "id": "w7", "argv": []}\n')
    assert isinstance(err, ProtocolError)
    assert err.msg_id == "w7" and err.msg_type == "start" and "argv" in err.detail


def test_unknown_fields_are_ignored() -> None:
    msg = dict(SAMPLES["exit"], future_field={"x": 1})
    assert decode(encode(msg)) == msg


def test_close_reports_an_unfinished_line() -> None:
    dec = Decoder()
    assert dec.feed(b'{"type": "pi') == []
    (err,) = dec.close()
    assert isinstance(err, ProtocolError) and "ended inside" in err.detail
    assert dec.close() == []


def test_seq_tracker() -> None:
    t = SeqTracker()
    assert t.observe(10) == 0  # the first message is the base
    assert t.observe(11) == 0
    assert t.observe(15) == 3 and t.missing == 3
    assert t.observe(15) == -1 and t.regressions == 1
    assert t.observe(16) == 0
    assert t.observe(0, restart=True) == 0 and t.last == 0
    assert t.observe(2) == 1 and t.missing == 4


def test_output_messages_fit_whatever_the_text() -> None:
    nasty = "\x00\x01" * 40000 + "é" * 30000 + "\U0001f600" * 20000
    msgs = output_messages("w1", "stdout", nasty)
    assert len(msgs) > 1
    assert "".join(m["data"] for m in msgs) == nasty
    for i, m in enumerate(msgs):
        assert len(encode(dict(m, seq=10**19 + i))) <= MAX_MESSAGE_BYTES
    assert output_messages("w1", "stdout", "hi") == [
        {"type": "output", "id": "w1", "stream": "stdout", "data": "hi"}]


def test_one_output_chunk_always_fits_one_message() -> None:
    worst = bytes(range(32)) * (p.OUTPUT_CHUNK_BYTES // 32)
    text = worst.decode("utf-8", "replace")
    (msg,) = output_messages("w" * p.MAX_ID_CHARS, "stdout", text)
    assert len(encode(dict(msg, seq=2**63))) <= MAX_MESSAGE_BYTES


def test_encoding_is_compact_utf8_json_lines() -> None:
    line = encode({"type": "output", "seq": 1, "id": "w", "stream": "stdout",
                   "data": "é\n"})
    assert line == '{"type":"output","seq":1,"id":"w","stream":"stdout","data":"é\\n"}\n'.encode()
    assert json.loads(line) == json.loads(line.decode())


# --- admin ----------------------------------------------------------------------------------


@pytest.mark.parametrize("msg", [
    {"type": "admin", "id": "a2", "op": "link_down", "iface": "lo"},
    {"type": "admin", "id": "a3", "op": "remount_ro", "path": "/"},
    {"type": "admin", "id": "a4", "op": "nproc", "pid": 77, "limit": 64},
])
def test_admin_ops_validate(msg: dict[str, Any]) -> None:
    assert validate(msg) is None
    assert Decoder(HOST_TYPES).feed(encode(msg)) == [msg]
    assert set(p.ADMIN_FIELDS[msg["op"]]) <= set(msg)


@pytest.mark.parametrize("msg, says", [
    ({"type": "admin", "id": "a", "op": "reboot"}, "field 'op' must be one of scrub"),
    ({"type": "admin", "id": "a", "op": "nproc", "pid": 7}, "admin op nproc lacks field 'limit'"),
    ({"type": "admin", "id": "a", "op": "scrub", "uid": 5, "gid": 5, "scratch": "/s",
      "shared": ["/tmp"]}, "lacks field 'private'"),
    ({"type": "admin", "id": "a", "op": "scrub", "uid": -1, "gid": 5, "scratch": "/s",
      "shared": [], "private": []}, "field 'uid' must be an integer"),
    ({"type": "admin", "id": "a", "op": "scrub", "uid": 5, "gid": 5, "scratch": "tmp/s",
      "shared": [], "private": []}, "field 'scratch' must be an absolute path"),
    ({"type": "admin", "id": "a", "op": "scrub", "uid": 5, "gid": 5, "scratch": "/s",
      "shared": ["/tmp", 3], "private": []}, "field 'shared' must be a list of absolute"),
    ({"type": "admin", "id": "a", "op": "nproc", "pid": 0, "limit": 1}, "field 'pid'"),
    ({"type": "admin", "id": "a", "op": "link_down", "iface": ""}, "field 'iface'"),
    ({"type": "admin_result", "seq": 1, "id": "a", "op": "scrub", "ok": False},
     "admin_result with ok=false lacks 'error'"),
    ({"type": "admin_result", "seq": 1, "id": "a", "op": "scrub", "ok": True,
      "killed": "3"}, "field 'killed' must be an integer"),
])
def test_bad_admin_messages_are_named(msg: dict[str, Any], says: str) -> None:
    problem = validate(msg)
    assert problem is not None and problem.kind == p.INVALID and says in problem.detail
    assert problem.msg_id == "a"  # the agent answers the request it could read


def test_admin_results_carry_their_fields() -> None:
    for op, fields in p.ADMIN_RESULTS.items():
        assert op in p.ADMIN_OPS
        assert set(fields) <= set(p.SCHEMAS["admin_result"][1])
    assert validate({"type": "admin_result", "seq": 2, "id": "a", "op": "nproc", "ok": False,
                     "error": "no such process"}) is None
