"""Domain XML templates (domain_templates/*.xml) loaded, checked and filled with lxml.

A template is a complete libvirt domain whose zone-specific values are placeholders; a
`<hvtsm:template kind=...>` element in its `<metadata>` says which kind it is:

- `lab`: direct kernel boot of the lab image (hvtsm/image), the host root over 9p;
- `disk`: a qcow2 overlay on a base image plus a cloud-init seed disk (hvtsm/image/seed.py).

`render` fills the values found by fixed paths (the "slots" below) and never formats XML
text: every change is an lxml element or attribute operation. A template is checked when it
is loaded (well-formed, valid against libvirt's own schema when installed, every slot of its
kind present exactly once) and the rendered domain is checked again, so a broken template
or a bad value fails with a TemplateError naming the file, never inside libvirt.
"""

from __future__ import annotations

import functools
import os
import re
import uuid as uuidlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TypeAlias

from lxml import etree

from hvtsm.errors import TemplateError

#: lxml's element type, under the name its own stubs and docs give it
Element: TypeAlias = etree._Element

TEMPLATE_NS = "urn:hvtsm:template:1"
AGENT_CHANNEL = "org.hvtsm.agent.0"
HOST_ROOT_TAG = "hostroot"
KINDS = ("lab", "disk")
ACCELS = ("kvm", "qemu")
LIBVIRT_SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")
#: a unix socket path must fit sockaddr_un.sun_path (108 bytes with the NUL)
MAX_SOCKET_PATH = 107

_NSMAP = {"hvtsm": TEMPLATE_NS}
_MARKER = "./metadata/hvtsm:template"
_CHANNEL = (f"./devices/channel[@type='unix'][target/@type='virtio']"
            f"[target/@name='{AGENT_CHANNEL}']")
_ROOT_DISK = "./devices/disk[@device='disk'][target/@dev='vda']"
_SEED_DISK = "./devices/disk[target/@dev='vdb']"

#: (path, what it is) that each kind of template must hold exactly once
_SLOTS: dict[str, tuple[tuple[str, str], ...]] = {
    "common": (
        ("./name", "<name>"),
        ("./uuid", "<uuid>"),
        ("./memory", "<memory>"),
        ("./currentMemory", "<currentMemory>"),
        ("./vcpu", "<vcpu>"),
        ("./os", "<os>"),
        (f"{_CHANNEL}/source[@mode='bind']",
         f"the agent channel <channel type='unix'> with <source mode='bind'> and "
         f"<target type='virtio' name='{AGENT_CHANNEL}'>"),
        ("./devices/interface[@type='ethernet']", "one <interface type='ethernet'>"),
        ("./devices/serial", "one <serial> (the console, logged to a file)"),
        ("./devices/memballoon[@model='virtio']", "<memballoon model='virtio'>"),
    ),
    "lab": (
        ("./os/kernel", "<os><kernel>"),
        ("./os/initrd", "<os><initrd>"),
        ("./os/cmdline", "<os><cmdline>"),
        (f"./devices/filesystem[target/@dir='{HOST_ROOT_TAG}']/source",
         f"the host root <filesystem> with <source dir=...> and <target dir='{HOST_ROOT_TAG}'>"),
    ),
    "disk": (
        (f"{_ROOT_DISK}/source", "the root <disk device='disk'> on vda with a <source>"),
        (f"{_ROOT_DISK}/backingStore/source",
         "a <backingStore> with a <source> (the base image) in the vda disk"),
        (f"{_SEED_DISK}/source", "the cloud-init seed <disk> on vdb with a <source>"),
    ),
}


@dataclass(frozen=True, kw_only=True)
class DomainParams:
    """The zone-specific values of a domain. Paths are host paths."""

    name: str
    uuid: str
    #: "kvm" or "qemu" (TCG): libvirt's <domain type>
    accel: str
    #: QEMU binary; None lets libvirt pick its default for the domain type
    emulator: str | None
    vcpus: int
    #: the balloon target (<currentMemory>)
    memory_kib: int
    #: the boot-time maximum (<memory>); the balloon can only go below it
    max_memory_kib: int
    #: direct kernel boot (lab template)
    kernel: str = ""
    initrd: str = ""
    cmdline: str = ""
    #: shared read-only over 9p with target dir "hostroot" (lab template)
    host_root: str = "/"
    #: unix socket QEMU listens on for the agent's virtio-serial port
    channel_path: str
    #: file the serial console (ttyS0) is logged to
    console_log: str
    #: tap device libvirt creates for the NIC (at most 15 characters)
    tap: str
    mac: str
    #: disk template: the zone's qcow2 overlay, its base image and the cloud-init seed
    disk_image: str | None = None
    base_image: str | None = None
    seed_image: str | None = None


# -- finding and loading ----------------------------------------------------------------------
def default_templates_dir() -> Path:
    """$HVTSM_TEMPLATES_DIR, else the domain_templates/ folder of this checkout."""
    env = os.environ.get("HVTSM_TEMPLATES_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "domain_templates"


def template_names(*, templates_dir: Path | None = None) -> list[str]:
    folder = Path(templates_dir) if templates_dir is not None else default_templates_dir()
    if not folder.is_dir():
        raise TemplateError("no such templates directory", file=str(folder),
                            hint="set HVTSM_TEMPLATES_DIR or pass a templates directory")
    return sorted(p.stem for p in folder.glob("*.xml") if p.is_file())


def template_path(name: str, *, templates_dir: Path | None = None) -> Path:
    folder = Path(templates_dir) if templates_dir is not None else default_templates_dir()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise TemplateError(f"bad template name {name!r} (letters, digits, '_', '.', '-')")
    path = folder / f"{name}.xml"
    if not path.is_file():
        names = template_names(templates_dir=folder) if folder.is_dir() else []
        raise TemplateError("no such template", file=str(path),
                            hint=f"templates: {', '.join(names) or 'none'}")
    return path


@functools.cache
def _schema() -> etree.RelaxNG | None:
    if not LIBVIRT_SCHEMA.is_file():
        return None
    try:
        return etree.RelaxNG(etree.parse(str(LIBVIRT_SCHEMA)))
    except (etree.RelaxNGParseError, etree.XMLSyntaxError, OSError):
        return None


def _check_schema(root: Element, file: str, what: str) -> None:
    schema = _schema()
    if schema is None or schema.validate(root):
        return
    err = schema.error_log.last_error
    where = f"line {err.line}: " if err is not None and err.line else ""
    detail = err.message if err is not None else "not valid"
    raise TemplateError(f"{what} is not a valid libvirt domain ({LIBVIRT_SCHEMA.name}): "
                        f"{where}{detail}", file=file)


def template_kind(root: Element) -> str:
    marker = root.find(_MARKER, _NSMAP)
    return "" if marker is None else marker.get("kind", "")


def load_template(name: str, *, templates_dir: Path | None = None) -> Element:
    """Parse and check a template; the element is a fresh copy the caller may change."""
    path = template_path(name, templates_dir=templates_dir)
    file = str(path)
    parser = etree.XMLParser(remove_blank_text=True, remove_comments=True,
                             resolve_entities=False, no_network=True)
    try:
        root = etree.parse(file, parser).getroot()
    except etree.XMLSyntaxError as exc:
        raise TemplateError(f"not well-formed XML: {exc}", file=file) from None
    if root.tag != "domain":
        raise TemplateError(f"the root element is <{root.tag}>, not <domain>", file=file)
    _check_schema(root, file, "the template")
    kind = template_kind(root)
    if kind not in KINDS:
        raise TemplateError(
            f"no <metadata><hvtsm:template kind=...> with kind {' or '.join(KINDS)} "
            f"(xmlns:hvtsm='{TEMPLATE_NS}')" + (f"; found kind {kind!r}" if kind else ""),
            file=file)
    for path_, what in (*_SLOTS["common"], *_SLOTS[kind]):
        found = root.xpath(path_, namespaces=_NSMAP)
        if len(found) != 1:
            raise TemplateError(
                f"a {kind} template needs exactly one {what} ({path_}); found {len(found)}",
                file=file)
    serial = root.find("./devices/serial")
    if serial.get("type") != "file" and serial.find("log") is None:
        raise TemplateError("the <serial> must be type='file' or have a <log file=...> "
                            "(the console log)", file=file)
    return root


# -- rendering --------------------------------------------------------------------------------
def render(name: str, params: DomainParams, *,
           templates_dir: Path | None = None) -> Element:
    """The template filled with `params`, checked against libvirt's schema."""
    root = load_template(name, templates_dir=templates_dir)
    file = str(template_path(name, templates_dir=templates_dir))
    kind = template_kind(root)
    _check_params(params, kind, file)

    root.set("type", params.accel)
    _text(root, "./name", params.name)
    _text(root, "./uuid", params.uuid)
    _memory(root.find("./memory"), params.max_memory_kib)
    _memory(root.find("./currentMemory"), params.memory_kib)
    _text(root, "./vcpu", str(params.vcpus))
    _cpu(root, params.accel)
    _emulator(root, params.emulator)
    if kind == "lab":
        _text(root, "./os/kernel", params.kernel)
        _text(root, "./os/initrd", params.initrd)
        _text(root, "./os/cmdline", params.cmdline)
        _one(root, f"./devices/filesystem[target/@dir='{HOST_ROOT_TAG}']/source").set(
            "dir", params.host_root)
    else:
        _one(root, f"{_ROOT_DISK}/source").set("file", str(params.disk_image))
        _one(root, f"{_ROOT_DISK}/backingStore/source").set("file", str(params.base_image))
        _one(root, f"{_SEED_DISK}/source").set("file", str(params.seed_image))
    _one(root, f"{_CHANNEL}/source").set("path", params.channel_path)
    serial = root.find("./devices/serial")
    if serial.get("type") == "file":
        _child(serial, "source").set("path", params.console_log)
    else:
        serial.find("log").set("file", params.console_log)
    iface = root.find("./devices/interface[@type='ethernet']")
    _child(iface, "mac", first=True).set("address", params.mac.lower())
    _child(iface, "target", after="mac").set("dev", params.tap)
    _check_schema(root, file, "the rendered domain")
    return root


def to_xml(element: Element) -> str:
    """The domain as text for libvirt (pretty-printed, no XML declaration)."""
    text: str = etree.tostring(element, encoding="unicode", pretty_print=True)
    return text


def _one(root: Element, path: str) -> Element:
    return root.xpath(path, namespaces=_NSMAP)[0]


def _text(root: Element, path: str, value: str) -> None:
    root.find(path).text = value


def _memory(element: Element, kib: int) -> None:
    element.set("unit", "KiB")
    element.text = str(kib)


def _child(parent: Element, tag: str, *, first: bool = False,
           after: str | None = None) -> Element:
    """The parent's <tag>, created (first, after <after>, or last) when missing."""
    found = parent.find(tag)
    if found is not None:
        return found
    element = etree.Element(tag)
    anchor = parent.find(after) if after else None
    if first:
        parent.insert(0, element)
    elif anchor is not None:
        anchor.addnext(element)
    else:
        parent.append(element)
    return element


def _cpu(root: Element, accel: str) -> None:
    cpu = root.find("./cpu")
    if accel == "kvm":
        if cpu is None:
            # the guest sees the host's CPU: no emulated model to translate
            cpu = etree.Element("cpu", mode="host-passthrough", check="none",
                                migratable="off")
            root.find("./os").addnext(cpu)
    elif cpu is not None and cpu.get("mode") in ("host-passthrough", "host-model"):
        # TCG cannot pass the host CPU through: use QEMU's default model
        root.remove(cpu)


def _emulator(root: Element, emulator: str | None) -> None:
    element = root.find("./devices/emulator")
    if emulator is None:
        if element is not None:
            element.getparent().remove(element)  # libvirt picks the default for the type
        return
    if element is None:
        element = etree.Element("emulator")
        root.find("./devices").insert(0, element)
    element.text = emulator


def _check_params(p: DomainParams, kind: str, file: str) -> None:
    def bad(field_: str, message: str) -> TemplateError:
        return TemplateError(f"parameter {field_}: {message}", file=file)

    for f in fields(p):
        value = getattr(p, f.name)
        if isinstance(value, str) and any(ord(c) < 32 for c in value):
            raise bad(f.name, "control characters are not allowed")
    if not p.name or "/" in p.name:
        raise bad("name", f"{p.name!r} must be non-empty without '/'")
    try:
        uuidlib.UUID(p.uuid)
    except ValueError:
        raise bad("uuid", f"{p.uuid!r} is not a UUID") from None
    if p.accel not in ACCELS:
        raise bad("accel", f"{p.accel!r} is not one of {', '.join(ACCELS)}")
    if p.vcpus < 1:
        raise bad("vcpus", f"{p.vcpus} must be at least 1")
    if p.max_memory_kib < 1:
        raise bad("max_memory_kib", f"{p.max_memory_kib} must be positive")
    if not 0 < p.memory_kib <= p.max_memory_kib:
        raise bad("memory_kib", f"{p.memory_kib} must be positive and at most "
                  f"max_memory_kib ({p.max_memory_kib})")
    if p.emulator is not None and not p.emulator.startswith("/"):
        raise bad("emulator", f"{p.emulator!r} must be an absolute path")
    paths = ["channel_path", "console_log"]
    if kind == "lab":
        paths += ["kernel", "initrd", "host_root"]
        if not p.cmdline:
            raise bad("cmdline", "a lab domain needs a kernel command line")
    else:
        paths += ["disk_image", "base_image", "seed_image"]
    for name in paths:
        value = getattr(p, name)
        if not value or not str(value).startswith("/"):
            raise bad(name, f"{value!r} must be an absolute path")
    if len(os.fsencode(p.channel_path)) > MAX_SOCKET_PATH:
        raise bad("channel_path", f"{p.channel_path!r} is longer than a unix socket path "
                  f"may be ({MAX_SOCKET_PATH} bytes)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}", p.tap):
        raise bad("tap", f"{p.tap!r} is not a network device name (1-15 characters: "
                  "letters, digits, '_', '.', '-')")
    if not re.fullmatch(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", p.mac):
        raise bad("mac", f"{p.mac!r} is not a MAC address")
    if int(p.mac[:2], 16) & 1:
        raise bad("mac", f"{p.mac!r} is a multicast address")


def zone_params(zone_id: str, *, accel: str = "qemu", kernel: str = "/boot/vmlinuz",
                initrd: str = "/var/cache/hvtsm/images/lab.cpio.gz",
                cmdline: str = "") -> DomainParams:
    """Example values derived from a zone id (for `hvtsm template render` and tests).

    Paths follow the libvirt driver's layout; nothing is created.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", zone_id):
        raise TemplateError(f"bad zone id {zone_id!r}")
    digest = uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"hvtsm-zone:{zone_id}")
    mac = "52:54:00:" + ":".join(f"{b:02x}" for b in digest.bytes[:3])
    zone_dir = f"/run/hvtsm/zones/{zone_id}"
    disk_dir = f"/var/lib/hvtsm/zones/{zone_id}"
    return DomainParams(
        name=f"hvtsm-{zone_id}", uuid=str(digest), accel=accel, emulator=None, vcpus=1,
        memory_kib=524288, max_memory_kib=524288, kernel=kernel, initrd=initrd,
        cmdline=cmdline or "console=ttyS0", host_root="/",
        channel_path=f"{zone_dir}/agent.sock", console_log=f"{zone_dir}/console.log",
        tap=f"hvtsm-{digest.hex[:8]}", mac=mac, disk_image=f"{disk_dir}/root.qcow2",
        base_image="/var/lib/hvtsm/images/base.qcow2", seed_image=f"{disk_dir}/seed.iso")
