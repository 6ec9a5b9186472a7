"""Probes: small, bounded looks at the guest from inside, used to verify restrictions.

Each probe takes the request's ``args`` and returns a JSON-able dict (the ``result`` of a
``probe_result``), or raises ProbeError (or any exception) for ``ok: false``. A probe that
ran but observed a failure (a refused connect) is a success whose result says so.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import json
import os
import shutil
import socket
import struct
import subprocess
import time
from typing import Any, Callable

SYS_NET = "/sys/class/net"
#: the most read_file returns (its encoding must fit one message)
READ_FILE_MAX = 32 * 1024


class ProbeError(Exception):
    """The probe could not run (bad arguments, nothing to look at)."""


def _arg(args: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = args.get(name, default)
    if value is None:
        raise ProbeError(f"argument '{name}' is required")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProbeError(f"argument '{name}' must be {kind.__name__}")
    return value


def _errno_name(e: OSError) -> str:
    if isinstance(e, socket.timeout):
        return "ETIMEDOUT"
    if e.errno is None:
        return type(e).__name__
    return errno.errorcode.get(e.errno, str(e.errno))


def tcp_connect(args: dict[str, Any]) -> dict[str, Any]:
    """{host, port, timeout=3} -> {ok, connected, errno, error, elapsed_ms, address}: ok and
    connected are the same (whether the connect succeeded); errno is its name (ECONNREFUSED,
    ETIMEDOUT, ENETUNREACH ...) when it did not."""
    host = _arg(args, "host", str)
    port = _arg(args, "port", int)
    timeout = _arg(args, "timeout", float, 3.0)
    if not 0 < port < 65536:
        raise ProbeError("port must be 1-65535")
    timeout = min(max(timeout, 0.01), 60.0)
    began = time.monotonic()
    address = None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        names = {getattr(socket, n): n for n in dir(socket) if n.startswith("EAI_")}
        return {"ok": False, "connected": False, "errno": names.get(e.errno, "EAI"),
                "error": str(e),
                "address": None,
                "elapsed_ms": round((time.monotonic() - began) * 1000, 3)}
    family, stype, proto, _, sockaddr = infos[0]
    address = sockaddr[0]
    sock = socket.socket(family, stype | socket.SOCK_CLOEXEC, proto)
    sock.settimeout(max(timeout - (time.monotonic() - began), 0.01))
    try:
        sock.connect(sockaddr)
        result: dict[str, Any] = {"connected": True, "errno": None, "error": None}
    except OSError as e:
        name = _errno_name(e)
        result = {"connected": False, "errno": name,
                  "error": os.strerror(e.errno) if e.errno else "timed out"}
    finally:
        sock.close()
    result["ok"] = result["connected"]
    result["address"] = address
    result["elapsed_ms"] = round((time.monotonic() - began) * 1000, 3)
    return result


def meminfo(args: dict[str, Any], path: str = "/proc/meminfo") -> dict[str, Any]:
    """/proc/meminfo as {field: kB} (page counts such as HugePages_Total stay counts)."""
    out: dict[str, Any] = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            fields = rest.split()
            if key and fields:
                try:
                    out[key.strip()] = int(fields[0])
                except ValueError:
                    continue
    for need in ("MemTotal", "MemFree"):
        if need not in out:
            raise ProbeError(f"{path} has no {need}")
    return out


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _ip_json() -> list[dict[str, Any]] | None:
    ip = shutil.which("ip")
    if ip is None:
        return None
    try:
        done = subprocess.run([ip, "-j", "addr", "show"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, timeout=3, check=True)
        data = json.loads(done.stdout.decode("utf-8", "replace") or "[]")
    except (OSError, subprocess.SubprocessError, ValueError):
        return None  # busybox ip has no -j
    return data if isinstance(data, list) else None


_SIOCGIFADDR = 0x8915
_SIOCGIFNETMASK = 0x891B


def _ioctl_ipv4(name: str) -> list[str]:
    """The primary IPv4 address of `name` (ioctl knows no secondary ones)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        req = struct.pack("256s", name.encode()[:15])
        try:
            addr = socket.inet_ntoa(fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, req)[20:24])
            mask = fcntl.ioctl(sock.fileno(), _SIOCGIFNETMASK, req)[20:24]
        except OSError:
            return []
        prefix = bin(struct.unpack("!I", mask)[0]).count("1")
        return [f"{addr}/{prefix}"]
    finally:
        sock.close()


def _ipv6(path: str = "/proc/net/if_inet6") -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 6:
                    continue
                raw = bytes.fromhex(parts[0])
                addr = socket.inet_ntop(socket.AF_INET6, raw)
                out.setdefault(parts[5], []).append(f"{addr}/{int(parts[2], 16)}")
    except (OSError, ValueError):
        pass
    return out


def interfaces(args: dict[str, Any], sys_net: str = SYS_NET) -> dict[str, Any]:
    """{interfaces: [{name, operstate, carrier, mtu, mac, ipv4[], ipv6[]}], source}"""
    try:
        names = sorted(os.listdir(sys_net))
    except OSError as e:
        raise ProbeError(f"cannot list {sys_net}: {e}") from e
    ip_data = _ip_json()
    by_name: dict[str, dict[str, Any]] = {}
    if ip_data is not None:
        for entry in ip_data:
            if isinstance(entry, dict) and isinstance(entry.get("ifname"), str):
                by_name[entry["ifname"]] = entry
    v6 = _ipv6()
    out = []
    for name in names:
        base = os.path.join(sys_net, name)
        carrier = _read(os.path.join(base, "carrier"))
        mtu = _read(os.path.join(base, "mtu"))
        item: dict[str, Any] = {
            "name": name,
            "operstate": _read(os.path.join(base, "operstate")) or "unknown",
            "carrier": carrier == "1" if carrier in ("0", "1") else None,
            "mtu": int(mtu) if mtu and mtu.isdigit() else None,
            "mac": _read(os.path.join(base, "address")),
        }
        found = by_name.get(name)
        if found is not None:
            infos = [a for a in found.get("addr_info", []) if isinstance(a, dict)]
            item["ipv4"] = ["{}/{}".format(a.get("local"), a.get("prefixlen"))
                            for a in infos if a.get("family") == "inet"]
            item["ipv6"] = ["{}/{}".format(a.get("local"), a.get("prefixlen"))
                            for a in infos if a.get("family") == "inet6"]
        else:
            item["ipv4"] = _ioctl_ipv4(name)
            item["ipv6"] = v6.get(name, [])
        out.append(item)
    return {"interfaces": out, "source": "ip" if ip_data is not None else "ioctl"}


def read_file(args: dict[str, Any]) -> dict[str, Any]:
    """{path, max_bytes=4096, encoding=text|base64} -> {data, size, truncated, encoding}"""
    path = _arg(args, "path", str)
    max_bytes = _arg(args, "max_bytes", int, 4096)
    encoding = _arg(args, "encoding", str, "text")
    if encoding not in ("text", "base64"):
        raise ProbeError("encoding must be text or base64")
    if not 0 <= max_bytes <= READ_FILE_MAX:
        raise ProbeError(f"max_bytes must be 0-{READ_FILE_MAX}")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        chunks = []
        got = 0
        while got <= max_bytes:
            try:
                chunk = os.read(fd, max_bytes + 1 - got)
            except BlockingIOError:
                break  # a fifo or device with nothing more now
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    truncated = len(data) > max_bytes
    data = data[:max_bytes]
    text = (base64.b64encode(data).decode("ascii") if encoding == "base64"
            else data.decode("utf-8", errors="replace"))
    return {"data": text, "size": len(data), "truncated": truncated, "encoding": encoding}


PROBES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "tcp_connect": tcp_connect,
    "meminfo": meminfo,
    "interfaces": interfaces,
    "read_file": read_file,
}
