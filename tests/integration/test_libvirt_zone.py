"""Libvirt zones on real TCG guests under the real libvirtd: effects seen from inside.

One guest boot drives a whole policy through the manager; one more checks `hvtsm run
--backend libvirt` end to end. Everything is torn down even when a test fails.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from hvtsm.host import probe_host
from hvtsm.lifecycle import Manager
from hvtsm.policy import parse_policy
from hvtsm.store import Store
from hvtsm.zones.base import Backend, DriverFactory
from tests.integration.cli_helpers import audit, hvtsm, json_lines

pytestmark = [pytest.mark.integration, pytest.mark.libvirt]

POLICY = """
name = "guest"
[[phase]]
at = "0s"
network = "full"
memory = "512MiB"
[[phase]]
at = "4s"
cpu_shares = 512
cpu_quota = 50
cpus = "0"
memory = "256MiB"
[[phase]]
at = "9s"
network = "loopback"
[[phase]]
at = "40s"
action = "terminate"

[forensics]
memory_dump = true
"""


def _libvirt_ready() -> str | None:
    if os.geteuid() != 0:
        return "libvirt zones need root"
    try:
        import libvirt

        libvirt.open("qemu:///system").close()
    except Exception as exc:  # any failure to reach libvirtd means: cannot run here
        return f"libvirtd not reachable: {exc}"
    return None


@pytest.fixture(scope="module")
def ready() -> None:
    reason = _libvirt_ready()
    if reason and not os.environ.get("CI"):
        pytest.skip(reason)
    assert reason is None, reason


def controller(driver: DriverFactory, tmp_path: Path,
               policy_text: str) -> tuple[Store, Manager, Any]:
    """A started manager over a fresh store, and the parsed policy."""
    store = Store(f"sqlite:///{tmp_path / 'hvtsm.db'}")
    manager = Manager(store, driver)
    manager.start()
    return store, manager, parse_policy(policy_text.encode(), source="test.toml")


def wait_phase(run: object, index: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while run.phase_index < index:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, f"phase {index} never applied"
        time.sleep(0.05)


def test_guest_zone_tightens_live(ready: None, tmp_path: Path, listener: int) -> None:
    from hvtsm.zones.factory import driver_factory
    from hvtsm.zones.libvirt.driver import LibvirtOptions, domain_name

    dumps = Path(tempfile.mkdtemp(prefix="hvtsm-dumps-", dir="/var/tmp"))
    factory = driver_factory(Backend.LIBVIRT, probe_host(),
                         libvirt=LibvirtOptions(accel="auto", dump_dir=dumps))
    store, manager, policy = controller(factory, tmp_path, POLICY)
    driver: Any = manager.driver
    run = None
    try:
        run = manager.launch(policy, ["sleep", "60"], policy_toml=POLICY, user="root")
        state = run.handle.state
        link = driver.agent_link(run.zone_id)
        assert link is not None
        gateway = state.host_addr.split("/")[0]
        assert state.accel in ("kvm", "qemu")
        before = link.probe("tcp_connect", host=gateway, port=listener, timeout=3)
        assert before["ok"], before
        mem_before = int(link.probe("meminfo")["MemTotal"])
        assert mem_before > 400 * 1024

        wait_phase(run, 1)
        dom = driver.connection.get().lookupByName(domain_name(run.zone_id))
        import libvirt

        sched = dom.schedulerParametersFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE)
        assert sched["cpu_shares"] == 512
        assert sched["vcpu_quota"] == 50_000
        pins = dom.vcpuPinInfo(libvirt.VIR_DOMAIN_AFFECT_LIVE)
        assert all(cpus[0] and not any(cpus[1:]) for cpus in pins)
        deadline = time.monotonic() + 10
        while int(link.probe("meminfo")["MemTotal"]) > 300 * 1024:
            assert time.monotonic() < deadline, "the guest never saw the balloon"
            time.sleep(0.2)

        wait_phase(run, 2)
        after = link.probe("tcp_connect", host=gateway, port=listener, timeout=2)
        assert not after["ok"], after
        # the link went down with the phase; the hot-unplug completes a little later
        deadline = time.monotonic() + 20
        while "eth0" in {i["name"] for i in link.probe("interfaces")["interfaces"]}:
            assert time.monotonic() < deadline, "the NIC was never unplugged"
            time.sleep(0.2)
        deadline = time.monotonic() + 5
        while not any("unplug complete" in e for e in zone_trail_summaries(store, run.zone_id)):
            assert time.monotonic() < deadline, "the unplug's completion was not audited"
            time.sleep(0.1)

        manager.terminate(run.zone_id, reason="test done")
        assert run.ended.wait(30)
        with pytest.raises(libvirt.libvirtError):
            driver.connection.get().lookupByName(domain_name(run.zone_id))
        assert not Path(state.dir).exists()
        assert state.dump is not None
        dump = Path(state.dump)
        assert dump.parent == dumps and dump.stat().st_size > 100 * 1024 * 1024
        assert not Path(f"/sys/class/net/{state.tap}").exists()
        events = [e for e in zone_trail_summaries(store, run.zone_id)]
        assert any("phase 2: network loopback" in e for e in events)
    finally:
        manager.shutdown()
        shutil.rmtree(dumps, ignore_errors=True)
        if run is not None:
            driver.remove(run.zone_id)
        assert run is None or run.zone_id not in driver.leftovers()


def zone_trail_summaries(store: Store, zone_id: str) -> list[str]:
    from hvtsm.store.audit import zone_trail

    with store.session() as session:
        return [e.summary for e in zone_trail(session, zone_id=zone_id)]


def test_hvtsm_run_backend_libvirt(ready: None, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'hvtsm.db'}"
    result = hvtsm(db, "run", "--backend", "libvirt", "--user", "root", "--json", "--",
                   "sh", "-c", "echo hello from $(uname -r); exit 5", timeout=240)
    assert result.returncode == 5, result.stderr
    events = json_lines(result.stdout)
    assert events[0]["event"] == "start" and events[0]["backend"] == "libvirt"
    output = "".join(e["data"] for e in events if e["event"] == "output")
    assert "hello from" in output
    assert events[-1]["event"] == "exit" and events[-1]["status"] == 5
    trail = audit(db, events[0]["zone"])
    assert trail[-1]["kind"] == "exited"


RESTART = """
name = "libvirtd-restart"
[[phase]]
at = "0s"
network = "full"
[[phase]]
at = "8s"
network = "loopback"
[[phase]]
at = "60s"
action = "terminate"
"""


def _restart_libvirtd() -> None:
    """As `.ci/run` and scripts/install-host.sh start it: no systemd on these machines."""
    import subprocess

    if Path("/run/systemd/system").exists():
        subprocess.run(["systemctl", "restart", "libvirtd"], check=True)
        return
    subprocess.run(["pkill", "-x", "libvirtd"], check=False)
    deadline = time.monotonic() + 10
    while subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "libvirtd did not stop"
        time.sleep(0.1)
    subprocess.run(["libvirtd", "-d"], check=True)


def test_zone_survives_a_libvirtd_restart(ready: None, tmp_path: Path, listener: int) -> None:
    from hvtsm.zones.factory import driver_factory
    from hvtsm.zones.libvirt.driver import LibvirtOptions, domain_name

    factory = driver_factory(Backend.LIBVIRT, probe_host(), libvirt=LibvirtOptions())
    _store, manager, policy = controller(factory, tmp_path, RESTART)
    driver: Any = manager.driver
    run = None
    try:
        run = manager.launch(policy, ["sleep", "60"], policy_toml=RESTART, user="root")
        link = driver.agent_link(run.zone_id)
        assert link is not None
        gateway = run.handle.state.host_addr.split("/")[0]
        assert link.probe("tcp_connect", host=gateway, port=listener, timeout=3)["ok"]
        _restart_libvirtd()
        wait_phase(run, 1, timeout=40)
        assert not link.probe("tcp_connect", host=gateway, port=listener, timeout=2)["ok"]
        assert driver.connection.reconnects >= 1
        assert driver.connection.get().lookupByName(domain_name(run.zone_id)).isActive()
    finally:
        if run is not None:
            manager.terminate(run.zone_id, reason="test done")
            run.ended.wait(30)
        manager.shutdown()
        if run is not None:
            driver.remove(run.zone_id)
            assert run.zone_id not in driver.leftovers()
