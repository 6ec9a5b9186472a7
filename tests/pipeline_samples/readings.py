"""Sensor report: download readings, parse them, compute statistics.

The entry function is a chain of steps, so `hvtsm pipeline` can split it: `fetch` reaches
the network, `parse` reads untrusted input, `summarize` only computes. Two steps also try
what their zones must not allow, and record what happened instead of failing.
"""

import csv
import errno
import io
import socket
import statistics
import struct
import urllib.request

from guest_agent.channel import ChannelRefused, open_channel


def gateway():
    with open("/proc/net/route") as routes:
        for line in routes.readlines()[1:]:
            fields = line.split()
            if fields[1] == "00000000":
                return socket.inet_ntoa(struct.pack("<L", int(fields[2], 16)))
    raise OSError(errno.ENETUNREACH, "no default route")


def fetch(port):
    host = gateway()
    url = f"http://{host}:{port}/readings.csv"
    with urllib.request.urlopen(url, timeout=5) as response:
        return {"host": host, "port": int(port), "csv": response.read().decode()}


def parse(download):
    rows = list(csv.DictReader(io.StringIO(download["csv"])))
    # a parser that phones home: hidden from the analysis (dynamic import), stopped by the
    # zone, which has no network
    net = __import__("soc" + "ket")
    probe = net.socket(net.AF_INET, net.SOCK_DGRAM)
    try:
        probe.sendto(b"parsed", (download["host"], download["port"]))
        reached = "sent"
    except OSError as exc:
        reached = f"unreachable (errno {exc.errno})"
    finally:
        probe.close()
    return {"rows": [{"sensor": r["sensor"], "value": float(r["value"])} for r in rows],
            "network": reached}


def summarize(parsed):
    values = [r["value"] for r in parsed["rows"]]
    try:
        # not granted: only parse -> summarize is; the broker must refuse this
        open_channel().send("fetch", b"leak")
        leak = "delivered"
    except ChannelRefused as exc:
        leak = f"refused: {exc.reason}"
    return {"count": len(values), "mean": statistics.mean(values), "max": max(values),
            "parse_network": parsed["network"], "leak": leak}


def main(port):
    download = fetch(port)
    parsed = parse(download)
    return summarize(parsed)


if __name__ == "__main__":
    import sys

    print(main(sys.argv[1]))
