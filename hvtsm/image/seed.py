"""The cloud-init NoCloud seed of a disk zone (domain_templates/disk.xml, disk vdb).

An ISO 9660 image with volume id `cidata` holding:

- `meta-data`: instance id and host name;
- `user-data`: domain_templates/cloud-init/user-data.yaml as it is (it installs the agent);
- `network-config`: version 2, eth0 matched by MAC with the zone's static address;
- `hvtsm/agent.tar`: the `guest_agent` package, unpacked by user-data to /opt/hvtsm/agent.

meta-data and network-config are written as JSON, which is valid YAML: no YAML library and no
text templating. The image is made with `genisoimage` (Debian package genisoimage), or
`xorriso`/`mkisofs` when that is what the host has.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from hvtsm.errors import HostError
from hvtsm.image.lab import default_agent_path

SEED_LABEL = "cidata"
ISO_TOOL_HINT = "apt-get install genisoimage"


def default_user_data() -> Path:
    from hvtsm.zones.libvirt.templates import default_templates_dir

    return default_templates_dir() / "cloud-init" / "user-data.yaml"


def iso_tool() -> list[str]:
    """The command (without arguments) that makes an ISO 9660 image here."""
    for name in ("genisoimage", "mkisofs"):
        path = shutil.which(name)
        if path:
            return [path]
    xorriso = shutil.which("xorriso")
    if xorriso:
        return [xorriso, "-as", "mkisofs"]
    raise HostError("no ISO 9660 tool for the cloud-init seed (genisoimage, mkisofs or "
                    "xorriso)", hint=ISO_TOOL_HINT)


def meta_data(*, instance_id: str, hostname: str) -> dict[str, str]:
    return {"instance-id": instance_id, "local-hostname": hostname}


def network_config(*, mac: str | None, ip: str | None, gateway: str | None,
                   dns: Sequence[str] = ()) -> dict[str, object]:
    """cloud-init network config v2: a static eth0, or no configured network without an ip."""
    if ip is None:
        return {"version": 2, "ethernets": {}}
    iface = ipaddress.ip_interface(ip)
    eth: dict[str, object] = {"dhcp4": False, "dhcp6": False,
                              "addresses": [iface.with_prefixlen]}
    if mac is not None:
        eth["match"] = {"macaddress": mac.lower()}
        eth["set-name"] = "eth0"
    if gateway is not None:
        eth["routes"] = [{"to": "default", "via": str(ipaddress.ip_address(gateway))}]
    if dns:
        eth["nameservers"] = {"addresses": [str(ipaddress.ip_address(a)) for a in dns]}
    return {"version": 2, "ethernets": {"eth0": eth}}


def agent_tar(agent_dir: Path) -> bytes:
    """The guest_agent package under `agent_dir` as a tar (no __pycache__, root-owned)."""
    package = agent_dir / "guest_agent"
    if not (package / "__init__.py").is_file():
        raise HostError(f"no guest_agent package in {agent_dir}")

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if "__pycache__" in info.name.split("/") or info.name.endswith(".pyc"):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(package, arcname="guest_agent", filter=clean)
    return buf.getvalue()


def build_seed(dest: Path, *, instance_id: str, hostname: str, mac: str | None = None,
               ip: str | None = None, gateway: str | None = None, dns: Sequence[str] = (),
               agent_dir: Path | None = None, user_data: Path | None = None,
               progress: Callable[[str], None] | None = None) -> Path:
    """Write the NoCloud seed ISO to `dest` (atomically) and return `dest`."""
    say = progress or (lambda _msg: None)
    dest = Path(dest)
    user_data = Path(user_data) if user_data is not None else default_user_data()
    agent_dir = Path(agent_dir) if agent_dir is not None else Path(default_agent_path())
    try:
        user_text = user_data.read_bytes()
    except OSError as exc:
        raise HostError(f"cannot read the cloud-init user-data {user_data}: {exc}") from None
    if not user_text.startswith(b"#cloud-config"):
        raise HostError(f"{user_data}: user-data must start with '#cloud-config'")
    tool = iso_tool()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hvtsm-seed-") as tmp:
        stage = Path(tmp) / "seed"
        (stage / "hvtsm").mkdir(parents=True)
        (stage / "user-data").write_bytes(user_text)
        (stage / "meta-data").write_text(
            json.dumps(meta_data(instance_id=instance_id, hostname=hostname), indent=2) + "\n")
        (stage / "network-config").write_text(
            json.dumps(network_config(mac=mac, ip=ip, gateway=gateway, dns=dns), indent=2)
            + "\n")
        (stage / "hvtsm" / "agent.tar").write_bytes(agent_tar(agent_dir))
        fd, out = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        os.close(fd)
        try:
            say(f"writing the cloud-init seed {dest} with {Path(tool[0]).name}")
            result = subprocess.run(
                [*tool, "-quiet", "-output", out, "-volid", SEED_LABEL, "-joliet", "-rock",
                 str(stage)], capture_output=True, text=True)
            if result.returncode != 0:
                raise HostError(f"{Path(tool[0]).name} failed making {dest}: "
                                f"{result.stderr.strip()[-500:]}")
            os.chmod(out, 0o644)
            os.replace(out, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(out)
            raise
    return dest
