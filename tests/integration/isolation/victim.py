"""A zone's workload holding things another zone must not reach: files in its scratch, a
unix socket in /tmp and an abstract one, a SysV shared memory segment, a secret in its
memory. Says it is ready with /tmp/ready, then waits to be ended."""

import ctypes
import os
import socket
import sys
import threading
import time

SECRET = b"victim-secret-" + os.urandom(8).hex().encode()
IPC_CREAT = 0o1000
SHM_KEY = 0x48565453  # "HVTS"


def serve(sock: socket.socket) -> None:
    while True:
        conn, _ = sock.accept()
        conn.sendall(SECRET)
        conn.close()


def main() -> None:
    for path in ("/tmp/secret", "/var/tmp/secret", "/dev/shm/secret"):
        with open(path, "wb") as f:
            f.write(SECRET)
        os.chmod(path, 0o644)  # readable by anyone who can reach it
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind("/tmp/victim.sock")
    os.chmod("/tmp/victim.sock", 0o777)
    unix.listen(4)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind("\0hvtsm-victim")
    abstract.listen(4)
    for sock in (unix, abstract):
        threading.Thread(target=serve, args=(sock,), daemon=True).start()
    libc = ctypes.CDLL(None, use_errno=True)
    shmid = libc.shmget(SHM_KEY, 4096, IPC_CREAT | 0o666)
    if shmid < 0:
        print("shmget failed", ctypes.get_errno(), file=sys.stderr)
    # a large leftover, if scratch outlived the zone
    with open("/tmp/bulk", "wb") as f:
        f.write(b"\0" * (32 << 20))
    with open("/tmp/ready", "w") as f:
        f.write(f"{os.getuid()}\n")
    kept = SECRET * 1000  # noqa: F841  (in memory, for /proc/PID/mem)
    time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 60)


main()
