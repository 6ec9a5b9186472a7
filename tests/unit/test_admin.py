"""Guest administration by typed request (guest_agent/admin.py, workers.AdminRequests):
the scrub against a fake /proc and run directory in tmp_path with recorded kills and
mounts (and real files owned by the workload's uid), and link_down, remount_ro and nproc
for real, each in a namespace or on a process of its own."""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from guest_agent import admin, sysvipc
from guest_agent.protocol import encode, validate
from guest_agent.workers import AdminRequests

REPO = Path(__file__).resolve().parents[2]
UID, GID, OTHER = 4242, 4343, 1717
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


class FakeGuest:
    """A /proc of made-up processes, a run directory, shared and private dirs."""

    def __init__(self, tmp: Path) -> None:
        self.proc = tmp / "proc"
        self.run = tmp / "run"
        for d in (self.proc / "self", self.run):
            d.mkdir(parents=True)
        (self.proc / "self" / "mountinfo").write_text(
            "22 1 0:21 / / rw shared:1 - overlay overlay rw\n")
        self.shared = [tmp / "tmp", tmp / "var-tmp", tmp / "shm"]
        for d in self.shared:
            d.mkdir()
        self.private = self.shared[:2]
        self.scratch = tmp / "scratch" / "zone"
        self.kills: list[int] = []
        self.mounts: list[str] = []
        self.removed_ipc: list[sysvipc.IpcObject] = []
        self.pauses = 0
        #: processes that ignore SIGKILL (a survivor)
        self.undying: set[int] = set()
        #: pid -> processes it forks when killed (born before the next round)
        self.forks: dict[int, list[int]] = {}

    def process(self, pid: int, uid: int, comm: str = "sh") -> None:
        d = self.proc / str(pid)
        d.mkdir()
        (d / "status").write_text(f"Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
        (d / "comm").write_text(comm + "\n")

    def kill(self, pid: int, uid: int) -> bool:
        assert admin.real_uid(str(self.proc), pid) == uid
        self.kills.append(pid)
        for child in self.forks.pop(pid, []):
            self.process(child, uid)
        if pid not in self.undying:
            shutil.rmtree(self.proc / str(pid))
        return True

    def mount_tmpfs(self, target: str) -> None:
        self.mounts.append(target)

    def sleep(self, _seconds: float) -> None:
        self.pauses += 1

    def ipc(self, kind: str, header: str, rows: list[str]) -> None:
        d = self.proc / "sysvipc"
        d.mkdir(exist_ok=True)
        (d / kind).write_text("\n".join([header, *rows]) + "\n")

    def system(self) -> admin.System:
        return admin.System(proc=str(self.proc), run=str(self.run), kill=self.kill,
                            mount_tmpfs=self.mount_tmpfs, sleep=self.sleep,
                            remove_ipc=self.removed_ipc.append)

    def request(self, **over: Any) -> dict[str, Any]:
        msg: dict[str, Any] = {"type": "admin", "id": "a1", "op": "scrub", "uid": UID,
                               "gid": GID, "scratch": str(self.scratch),
                               "shared": [str(d) for d in self.shared],
                               "private": [str(d) for d in self.private]}
        msg.update(over)
        assert validate(msg) is None
        return msg


def owned(path: Path, uid: int = UID, *, directory: bool = False, text: str = "x") -> Path:
    if directory:
        path.mkdir()
    else:
        path.write_text(text)
    os.lchown(path, uid, GID)
    return path


@pytest.fixture
def guest(tmp_path: Path) -> FakeGuest:
    if os.geteuid() != 0:
        pytest.skip("files owned by another uid need root")
    return FakeGuest(tmp_path)


def test_scrub_kills_round_after_round_and_spares_others(guest: FakeGuest) -> None:
    guest.process(100, UID)
    guest.process(101, UID)
    guest.process(200, OTHER)
    guest.forks[101] = [102]  # forked between the listing and the kill
    result = admin.perform(guest.request(), guest.system())
    assert guest.kills == [100, 101, 102]
    assert result["killed"] == 3 and result["rounds"] == 2 and guest.pauses == 2
    assert (guest.proc / "200").exists()
    assert set(result) == {"killed", "deleted", "rounds", "seconds", "ipc_removed"}


def test_a_surviving_process_fails_the_scrub_by_name(guest: FakeGuest) -> None:
    guest.process(300, UID, comm="stubborn")
    guest.undying.add(300)
    with pytest.raises(admin.AdminError) as info:
        admin.perform(guest.request(), guest.system())
    assert "survived 40 rounds" in str(info.value) and "300 (stubborn)" in str(info.value)
    assert len(guest.kills) == admin.MAX_ROUNDS
    assert not guest.scratch.exists()  # nothing else was done


def test_first_scrub_mounts_private_tmp_and_records_known(guest: FakeGuest) -> None:
    # the second private dir is a mount of its own already
    with open(guest.proc / "self" / "mountinfo", "a") as f:
        f.write(f"40 22 0:40 / {guest.private[1]} rw - tmpfs tmpfs rw\n")
    before = owned(guest.shared[2] / "left-by-the-image")
    theirs = owned(guest.shared[0] / "root-file", uid=0)
    first = admin.perform(guest.request(), guest.system())
    assert guest.mounts == [str(guest.private[0])]
    known = guest.run / admin.KNOWN.format(uid=UID)
    assert known.read_text() == f"{before}\n"
    assert first["deleted"] == 0 and before.exists() and theirs.exists()

    # the workload's leftovers: files, a tree, a symlink to something that must stay
    made = [owned(guest.shared[0] / "out.txt"), owned(guest.shared[1] / "tree", directory=True)]
    owned(made[1] / "deep", directory=True)
    owned(made[1] / "deep" / "f")
    target = owned(guest.shared[0] / "keep-target", uid=0)
    link = guest.shared[2] / "link"
    link.symlink_to(target)
    os.lchown(link, UID, GID)
    second = admin.perform(guest.request(), guest.system())
    assert second["deleted"] == 3
    assert not any(p.exists() or p.is_symlink() for p in [*made, link])
    assert before.exists() and theirs.exists() and target.exists()
    assert guest.mounts == [str(guest.private[0])]  # only on the first scrub


def test_scratch_is_made_fresh(guest: FakeGuest) -> None:
    guest.scratch.mkdir(parents=True)
    owned(guest.scratch / "old")
    admin.perform(guest.request(), guest.system())
    st = guest.scratch.stat()
    assert list(guest.scratch.iterdir()) == []
    assert stat.S_IMODE(st.st_mode) == 0o700 and (st.st_uid, st.st_gid) == (UID, GID)


def test_a_file_that_survives_fails_the_scrub_by_name(guest: FakeGuest,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    admin.perform(guest.request(), guest.system())
    stuck = owned(guest.shared[0] / "stuck")
    monkeypatch.setattr(admin, "_remove", lambda path: None)
    with pytest.raises(admin.AdminError, match=f"file.* of uid {UID} could not be deleted: "
                                               f"{stuck}"):
        admin.perform(guest.request(), guest.system())


def test_a_failed_mount_fails_and_is_tried_again(guest: FakeGuest) -> None:
    def refuse(target: str) -> None:
        raise PermissionError(1, "Operation not permitted", target)

    system = admin.System(proc=str(guest.proc), run=str(guest.run), kill=guest.kill,
                          mount_tmpfs=refuse, sleep=guest.sleep)
    with pytest.raises(admin.AdminError, match="could not mount a private tmpfs on "
                                               f"{guest.private[0]}"):
        admin.perform(guest.request(), system)
    assert not (guest.run / admin.KNOWN.format(uid=UID)).exists()
    admin.perform(guest.request(), guest.system())
    assert guest.mounts == [str(d) for d in guest.private]


@pytest.mark.parametrize("over, says", [
    ({"uid": 0}, "refusing to scrub uid 0"),
    ({"scratch": "/"}, "scratch '/'"),
    ({"scratch": "/var/tmp/../.."}, "plainly"),
    ({"shared": ["/tmp/./x"]}, "plainly"),
])
def test_scrub_refuses_what_would_harm_the_guest(guest: FakeGuest, over: dict[str, Any],
                                                 says: str) -> None:
    with pytest.raises(admin.AdminError, match=says):
        admin.perform(guest.request(**over), guest.system())
    assert guest.kills == []


def test_processes_of_reads_real_uids(tmp_path: Path) -> None:
    assert os.getpid() not in admin.processes_of(os.geteuid())  # never the agent itself
    mine = subprocess.Popen(["sleep", "30"])
    try:
        assert mine.pid in admin.processes_of(os.getuid())
        assert admin.entries_of(os.getuid(), [str(tmp_path / "missing"), str(tmp_path)]) == []
    finally:
        mine.kill()
        mine.wait()


# --- the request runner ---------------------------------------------------------------------


def test_admin_requests_answer_in_order_off_the_reader(guest: FakeGuest) -> None:
    replies: list[dict[str, Any]] = []
    done = threading.Event()

    def send(msg: dict[str, Any]) -> None:
        replies.append(msg)
        if len(replies) == 3:
            done.set()

    runner = AdminRequests(send, guest.system())
    runner.on_admin(guest.request(id="s1"))
    runner.on_admin(guest.request(id="s2", uid=0))
    runner.on_admin({"type": "admin", "id": "n1", "op": "nproc", "pid": 2**30, "limit": 5})
    assert done.wait(10)
    runner.close()
    assert [r["id"] for r in replies] == ["s1", "s2", "n1"]
    assert replies[0]["ok"] and replies[0]["op"] == "scrub" and "killed" in replies[0]
    assert not replies[1]["ok"] and "uid 0" in replies[1]["error"]
    assert not replies[2]["ok"] and "RLIMIT_NPROC" in replies[2]["error"]
    for r in replies:
        assert validate(dict(r, seq=1)) is None
        encode(dict(r, seq=1))


# --- real effects ---------------------------------------------------------------------------


def in_namespace(flags: list[str], code: str) -> str:
    done = subprocess.run(["unshare", *flags, sys.executable, "-c", code],
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@root_only
def test_link_down_in_a_namespace_of_its_own() -> None:
    code = """
import fcntl, socket, struct
from guest_agent import admin
def flags():
    with socket.socket() as s:
        got = fcntl.ioctl(s.fileno(), admin.SIOCGIFFLAGS, struct.pack(admin.IFREQ, b"lo", 0))
        return struct.unpack(admin.IFREQ, got)[1]
with socket.socket() as s:
    fcntl.ioctl(s.fileno(), admin.SIOCSIFFLAGS, struct.pack(admin.IFREQ, b"lo", flags() | 1))
up = flags() & 1
first = admin.perform({"op": "link_down", "iface": "lo"})
again = admin.perform({"op": "link_down", "iface": "lo"})
try:
    admin.perform({"op": "link_down", "iface": "nosuch0"})
except admin.AdminError as e:
    print("nosuch", "nosuch0" in str(e))
print(up, flags() & 1, first["was_up"], again["was_up"])
"""
    assert in_namespace(["-n"], code).split() == ["nosuch", "True", "1", "0", "True", "False"]


@root_only
def test_remount_ro_in_a_namespace_of_its_own(tmp_path: Path) -> None:
    code = f"""
import errno, os
from guest_agent import admin
target = {str(tmp_path)!r}
admin.mount_tmpfs(target)
open(os.path.join(target, "before"), "w").close()
done = admin.perform({{"op": "remount_ro", "path": target}})
st = os.statvfs(target)
try:
    open(os.path.join(target, "after"), "w")
    wrote = "wrote"
except OSError as e:
    wrote = errno.errorcode[e.errno]
print(done["was_ro"], done["how"], bool(st.f_flag & os.ST_RDONLY), bool(st.f_flag & os.ST_NOSUID),
      wrote)
"""
    out = in_namespace(["-m", "--propagation", "private"], code).split()
    assert out == ["False", "superblock", "True", "True", "EROFS"]
    assert not (tmp_path / "before").exists()  # that tmpfs was the namespace's alone


@root_only
def test_nproc_limits_the_process() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        result = admin.perform({"op": "nproc", "pid": child.pid, "limit": 7})
        assert result["pid"] == child.pid and result["limit"] == 7
        soft, hard = resource.prlimit(child.pid, resource.RLIMIT_NPROC)
        assert (soft, hard) == (7, 7)
        assert len(result["previous"]) == 2
        line = next(x for x in Path(f"/proc/{child.pid}/limits").read_text().splitlines()
                    if x.startswith("Max processes"))
        assert line.split()[2:4] == ["7", "7"]
    finally:
        child.kill()
        child.wait()


SHM_HEADER = ("       key      shmid perms                  size  cpid  lpid nattch   uid   gid  "
              "cuid  cgid      atime      dtime      ctime                   rss                  "
              "swap")
SEM_HEADER = "       key      semid perms      nsems   uid   gid  cuid  cgid      otime      ctime"


def test_scrub_removes_the_users_system_v_objects(guest: FakeGuest) -> None:
    """A segment outlives its maker: the next zone of the same user in the guest must not
    attach it."""
    guest.ipc("shm", SHM_HEADER, [
        f"1213484372 7 666 4096 10 10 0 {UID} {GID} {UID} {GID} 0 0 0 4096 0",
        f"0 8 600 4096 10 10 0 {OTHER} {GID} {OTHER} {GID} 0 0 0 4096 0",
        f"0 9 666 4096 10 10 0 {OTHER} {GID} {UID} {GID} 0 0 0 4096 0",  # given away
    ])
    guest.ipc("sem", SEM_HEADER, [f"0 3 600 1 {UID} {GID} {UID} {GID} 0 0"])
    result = admin.scrub(guest.request(), guest.system())
    assert result["ipc_removed"] == 3
    assert {(o.kind, o.ident) for o in guest.removed_ipc} == {
        (sysvipc.Kind.SHM, 7), (sysvipc.Kind.SHM, 9), (sysvipc.Kind.SEM, 3)}


@root_only
def test_system_v_objects_are_found_and_removed_in_the_kernel() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    shmid = libc.shmget(0, 4096, 0o1000 | 0o600)  # IPC_PRIVATE, IPC_CREAT
    assert shmid >= 0
    try:
        [found] = [o for o in sysvipc.objects_of(0) if o.kind is sysvipc.Kind.SHM
                   and o.ident == shmid]
        sysvipc.remove(found)
        assert not [o for o in sysvipc.objects_of(0) if o.ident == shmid
                    and o.kind is sysvipc.Kind.SHM]
        sysvipc.remove(found)  # already gone: no failure
    finally:
        libc.shmctl(shmid, 0, None)
