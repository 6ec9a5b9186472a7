"""Domain templates: loading checks, rendering (golden files), libvirt's own validation,
the cloud-init seed of the disk template, and `hvtsm template`.

Golden files: tests/golden/<case>-out.xml. After an intended change to a template or to
render(), regenerate them with `HVTSM_REGEN_GOLDEN=1 python -m pytest tests/unit/test_templates.py`
and review the diff.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from lxml import etree

from hvtsm.cli.main import main
from hvtsm.errors import TemplateError
from hvtsm.zones.libvirt import templates
from hvtsm.zones.libvirt.templates import (
    DomainParams,
    load_template,
    render,
    template_names,
    to_xml,
    zone_params,
)

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
REGEN = os.environ.get("HVTSM_REGEN_GOLDEN") == "1"
TEMPLATES = templates.default_templates_dir()

LAB = DomainParams(
    name="hvtsm-golden", uuid="6f1c1f5e-2b6e-4c1a-9a57-1d1f3b0c0a01", accel="qemu",
    emulator=None, vcpus=1, memory_kib=393216, max_memory_kib=524288,
    kernel="/var/cache/hvtsm/images/vmlinux-6.1.0-56-amd64-0123456789abcdef",
    initrd="/var/cache/hvtsm/images/lab-6.1.0-56-amd64-0123456789abcdef.cpio.gz",
    cmdline="console=ttyS0 quiet panic=-1 hvtsm.python=/usr/bin/python3 hvtsm.agent=/opt/hvtsm "
    "hvtsm.ip=10.214.0.6/30 hvtsm.gw=10.214.0.5",
    host_root="/", channel_path="/run/hvtsm/zones/golden/agent.sock",
    console_log="/run/hvtsm/zones/golden/console.log", tap="hvtsm-golden",
    mac="52:54:00:AB:CD:EF")
DISK = dataclasses.replace(
    LAB, kernel="", initrd="", cmdline="", memory_kib=1048576, max_memory_kib=2097152,
    vcpus=2, disk_image="/var/lib/hvtsm/zones/golden/root.qcow2",
    base_image="/var/lib/hvtsm/images/debian-12-generic-amd64.qcow2",
    seed_image="/var/lib/hvtsm/zones/golden/seed.iso")
CASES = {
    "lab": ("lab", LAB),
    "lab-kvm": ("lab", dataclasses.replace(LAB, accel="kvm",
                                           emulator="/usr/bin/qemu-system-x86_64", vcpus=2)),
    "disk": ("disk", DISK),
}


def _copy_templates(tmp_path: Path) -> Path:
    folder = tmp_path / "templates"
    shutil.copytree(TEMPLATES, folder)
    return folder


def _edit(folder: Path, name: str, edit) -> None:
    path = folder / f"{name}.xml"
    tree = etree.parse(str(path))
    edit(tree.getroot())
    tree.write(str(path))


# -- golden files -----------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_render_matches_golden(case):
    name, params = CASES[case]
    text = to_xml(render(name, params))
    golden = GOLDEN / f"{case}-out.xml"
    if REGEN:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.is_file(), f"missing {golden}: run with HVTSM_REGEN_GOLDEN=1"
    assert text == golden.read_text(), (
        f"{case}: rendered XML differs from {golden}; if the change is intended, "
        "regenerate with HVTSM_REGEN_GOLDEN=1 and review the diff")


def test_rendered_values():
    lab = render("lab", LAB)
    assert lab.get("type") == "qemu" and lab.findtext("name") == "hvtsm-golden"
    assert lab.findtext("memory") == "524288" and lab.findtext("currentMemory") == "393216"
    assert lab.find("memory").get("unit") == "KiB"
    assert lab.findtext("os/kernel") == LAB.kernel and lab.findtext("os/cmdline") == LAB.cmdline
    assert lab.find("devices/emulator") is None  # libvirt picks its default
    assert lab.find("cpu") is None
    fs = lab.find("devices/filesystem")
    assert fs.get("accessmode") == "passthrough" and fs.find("readonly") is not None
    assert fs.find("source").get("dir") == "/" and fs.find("target").get("dir") == "hostroot"
    channel = lab.find("devices/channel")
    assert channel.find("source").attrib == {"mode": "bind", "path": LAB.channel_path}
    assert channel.find("target").get("name") == "org.hvtsm.agent.0"
    nic = lab.find("devices/interface")
    assert nic.find("mac").get("address") == "52:54:00:ab:cd:ef"
    assert nic.find("target").get("dev") == "hvtsm-golden"
    assert nic.find("link").get("state") == "up" and nic.find("model").get("type") == "virtio"
    assert lab.find("devices/serial/log").get("file") == LAB.console_log
    assert lab.find("devices/memballoon/stats").get("period")
    assert [lab.findtext(f"on_{e}") for e in ("poweroff", "reboot", "crash")] == ["destroy"] * 3
    assert lab.find("vcpu").get("placement") == "static"
    assert lab.find("cputune") is not None

    kvm = render("lab", CASES["lab-kvm"][1])
    assert kvm.get("type") == "kvm" and kvm.find("cpu").get("mode") == "host-passthrough"
    assert kvm.findtext("devices/emulator") == "/usr/bin/qemu-system-x86_64"

    disk = render("disk", DISK)
    vda = disk.xpath("devices/disk[target/@dev='vda']")[0]
    assert vda.find("source").get("file") == DISK.disk_image
    assert vda.find("backingStore/source").get("file") == DISK.base_image
    vdb = disk.xpath("devices/disk[target/@dev='vdb']")[0]
    assert vdb.find("source").get("file") == DISK.seed_image and vdb.find("readonly") is not None
    assert disk.find("os/kernel") is None


def test_render_returns_independent_trees():
    first = render("lab", LAB)
    first.find("name").text = "changed"
    assert render("lab", LAB).findtext("name") == "hvtsm-golden"


# -- libvirt validates what we render ---------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_libvirt_test_driver_defines_it(case):
    libvirt = pytest.importorskip("libvirt")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    name, params = CASES[case]
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXMLFlags(to_xml(render(name, params)),
                                  libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        try:
            back = etree.fromstring(dom.XMLDesc(0))
            assert back.findtext("name") == params.name
            assert back.get("type") == params.accel
            assert back.xpath("devices/channel/target/@name") == ["org.hvtsm.agent.0"]
        finally:
            dom.undefine()
    finally:
        conn.close()


# -- loading checks ---------------------------------------------------------------------------
def test_template_names():
    assert {"lab", "disk"} <= set(template_names())


def _remove(path: str):
    def edit(root):
        for element in root.xpath(path):
            element.getparent().remove(element)
    return edit


@pytest.mark.parametrize("name, edit, match", [
    ("lab", _remove("devices/channel"), "agent channel"),
    ("lab", _remove("os/kernel"), r"<os><kernel>"),
    ("lab", _remove("devices/filesystem"), "host root <filesystem>"),
    ("lab", _remove("devices/memballoon"), "memballoon"),
    ("lab", _remove("metadata"), "hvtsm:template kind"),
    ("lab", _remove("devices/serial/log"), "serial"),
    ("disk", _remove("devices/disk[target/@dev='vda']/backingStore"), "backingStore"),
    ("disk", _remove("devices/disk[target/@dev='vdb']"), "seed"),
])
def test_broken_templates_name_file_and_problem(tmp_path, name, edit, match):
    folder = _copy_templates(tmp_path)
    _edit(folder, name, edit)
    with pytest.raises(TemplateError, match=match) as exc:
        load_template(name, templates_dir=folder)
    assert exc.value.file == str(folder / f"{name}.xml")
    assert str(folder / f"{name}.xml") in str(exc.value)


def test_two_nics_are_refused(tmp_path):
    folder = _copy_templates(tmp_path)

    def twice(root):
        iface = root.find("devices/interface")
        iface.addnext(etree.fromstring(etree.tostring(iface)))
    _edit(folder, "lab", twice)
    with pytest.raises(TemplateError, match="found 2"):
        load_template("lab", templates_dir=folder)


def test_not_xml_not_domain_not_schema_valid(tmp_path):
    folder = _copy_templates(tmp_path)
    (folder / "bad.xml").write_text("<domain><name>x</name>")
    with pytest.raises(TemplateError, match="not well-formed") as exc:
        load_template("bad", templates_dir=folder)
    assert "bad.xml" in str(exc.value)
    (folder / "bad.xml").write_text("<network/>")
    with pytest.raises(TemplateError, match="not <domain>"):
        load_template("bad", templates_dir=folder)
    if templates._schema() is None:
        pytest.skip("libvirt's domain.rng is not installed")
    _edit(folder, "lab", lambda root: setattr(root.find("vcpu"), "text", "many"))
    with pytest.raises(TemplateError, match="not a valid libvirt domain"):
        load_template("lab", templates_dir=folder)


def test_unknown_template_lists_the_known_ones(tmp_path):
    with pytest.raises(TemplateError, match="no such template") as exc:
        load_template("nope")
    assert "lab" in exc.value.hint and "disk" in exc.value.hint
    with pytest.raises(TemplateError, match="bad template name"):
        load_template("../lab")
    with pytest.raises(TemplateError, match="no such templates directory"):
        template_names(templates_dir=tmp_path / "missing")


def test_file_serial_and_host_cpu_in_template(tmp_path):
    """A template may log the console with <serial type='file'>, and pin a CPU model;
    a host CPU mode is dropped under TCG, which cannot pass the host CPU through."""
    folder = _copy_templates(tmp_path)

    def edit(root):
        serial = root.find("devices/serial")
        serial.attrib["type"] = "file"
        serial.remove(serial.find("log"))
        serial.insert(0, etree.Element("source", path="/placeholder"))
        console = root.find("devices/console")
        console.getparent().remove(console)
        root.find("os").addnext(etree.Element("cpu", mode="host-model"))
    _edit(folder, "lab", edit)
    dom = render("lab", LAB, templates_dir=folder)
    assert dom.find("devices/serial/source").get("path") == LAB.console_log
    assert dom.find("cpu") is None
    kvm = render("lab", dataclasses.replace(LAB, accel="kvm"), templates_dir=folder)
    assert kvm.find("cpu").get("mode") == "host-model"


@pytest.mark.parametrize("change, match", [
    ({"accel": "xen"}, "accel"),
    ({"memory_kib": 600000}, "memory_kib"),
    ({"vcpus": 0}, "vcpus"),
    ({"uuid": "nope"}, "uuid"),
    ({"name": "a/b"}, "name"),
    ({"mac": "52:54:00:zz:00:00"}, "mac"),
    ({"mac": "01:00:5e:00:00:01"}, "multicast"),
    ({"tap": "a-much-too-long-tap-name"}, "tap"),
    ({"kernel": "vmlinuz"}, "kernel"),
    ({"cmdline": ""}, "cmdline"),
    ({"channel_path": "/run/" + "x" * 120}, "unix socket"),
    ({"console_log": "/tmp/a\nb"}, "control characters"),
    ({"emulator": "qemu"}, "emulator"),
])
def test_bad_params(change, match):
    with pytest.raises(TemplateError, match=match) as exc:
        render("lab", dataclasses.replace(LAB, **change))
    assert "lab.xml" in str(exc.value)


def test_disk_params_need_images():
    with pytest.raises(TemplateError, match="seed_image"):
        render("disk", dataclasses.replace(DISK, seed_image=None))


def test_zone_params_are_stable_and_valid():
    a, b = zone_params("z42"), zone_params("z42")
    assert a == b and a.name == "hvtsm-z42" and len(a.tap) <= 15
    assert zone_params("z43").mac != a.mac
    render("lab", a)
    render("disk", a)
    with pytest.raises(TemplateError, match="bad zone id"):
        zone_params("a b")


# -- cloud-init seed --------------------------------------------------------------------------
def test_user_data_is_cloud_config():
    from hvtsm.image.seed import default_user_data

    text = default_user_data().read_text()
    assert text.startswith("#cloud-config\n")
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load(text)
    unit = next(f for f in data["write_files"] if f["path"].endswith("hvtsm-agent.service"))
    assert "python3 -m guest_agent" in unit["content"]
    assert ["systemctl", "enable", "--now", "hvtsm-agent.service"] in data["runcmd"]


def test_network_config():
    from hvtsm.image.seed import network_config

    cfg = network_config(mac="52:54:00:AA:BB:CC", ip="10.214.0.6/30", gateway="10.214.0.5",
                         dns=["10.214.0.5"])
    eth = cfg["ethernets"]["eth0"]
    assert cfg["version"] == 2 and eth["addresses"] == ["10.214.0.6/30"]
    assert eth["match"] == {"macaddress": "52:54:00:aa:bb:cc"}
    assert eth["routes"] == [{"to": "default", "via": "10.214.0.5"}]
    assert network_config(mac=None, ip=None, gateway=None) == {"version": 2, "ethernets": {}}


def test_build_seed(tmp_path):
    from hvtsm.image.seed import build_seed, iso_tool

    try:
        iso_tool()
    except Exception:
        pytest.skip("no ISO tool (apt-get install genisoimage)")
    isoinfo = shutil.which("isoinfo")
    agent = tmp_path / "src"
    (agent / "guest_agent" / "__pycache__").mkdir(parents=True)
    (agent / "guest_agent" / "__init__.py").write_text("")
    (agent / "guest_agent" / "__main__.py").write_text("print('agent')\n")
    (agent / "guest_agent" / "__pycache__" / "x.pyc").write_bytes(b"junk")
    seed = build_seed(tmp_path / "out" / "seed.iso", instance_id="hvtsm-z1", hostname="z1",
                      mac="52:54:00:00:00:01", ip="10.214.0.6/30", gateway="10.214.0.5",
                      agent_dir=agent)
    data = seed.read_bytes()
    assert data[0x8001:0x8006] == b"CD001" and b"CIDATA" in data[0x8000:0x8800].upper()
    if isoinfo is None:
        return

    def extract(name: str) -> bytes:
        return subprocess.run([isoinfo, "-i", str(seed), "-R", "-x", name],
                              capture_output=True, check=True).stdout

    listing = subprocess.run([isoinfo, "-i", str(seed), "-R", "-f"], capture_output=True,
                             text=True, check=True).stdout.split()
    assert {"/user-data", "/meta-data", "/network-config", "/hvtsm/agent.tar"} <= set(listing)
    assert json.loads(extract("/meta-data")) == {"instance-id": "hvtsm-z1",
                                                 "local-hostname": "z1"}
    net = json.loads(extract("/network-config"))
    assert net["ethernets"]["eth0"]["addresses"] == ["10.214.0.6/30"]
    assert extract("/user-data").startswith(b"#cloud-config")
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(extract("/hvtsm/agent.tar"))) as tar:
        names = tar.getnames()
    assert "guest_agent/__main__.py" in names and not any("pycache" in n for n in names)


# -- CLI --------------------------------------------------------------------------------------
def test_cli_list(capsys):
    assert main(["template", "list"]) == 0
    out = capsys.readouterr().out
    assert "lab" in out and "disk" in out and "ok" in out
    assert main(["template", "list", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    kinds = {r["name"]: r["kind"] for r in rows if r["valid"]}
    assert kinds["lab"] == "lab" and kinds["disk"] == "disk"


def test_cli_list_reports_invalid(tmp_path, capsys):
    folder = _copy_templates(tmp_path)
    (folder / "broken.xml").write_text("<domain")
    assert main(["template", "list", "--templates-dir", str(folder)]) == 1
    assert "invalid: not well-formed" in capsys.readouterr().out


def test_cli_render(capsys):
    assert main(["template", "render", "lab", "--zone-id", "t1", "--accel", "kvm"]) == 0
    dom = etree.fromstring(capsys.readouterr().out)
    assert dom.get("type") == "kvm" and dom.findtext("name") == "hvtsm-t1"
    assert dom.xpath("devices/channel/source/@path") == ["/run/hvtsm/zones/t1/agent.sock"]
    assert "hvtsm.python=/usr/bin/python3" in dom.findtext("os/cmdline")
    assert main(["template", "render", "disk", "--zone-id", "t1"]) == 0
    assert etree.fromstring(capsys.readouterr().out).get("type") == "qemu"
    assert main(["template", "render", "nope"]) == 125
    assert "no such template" in capsys.readouterr().err
