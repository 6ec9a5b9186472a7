"""`hvtsm template list` and `hvtsm template render`: the libvirt domain templates."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hvtsm.cli.exits import EXIT_INVALID, EXIT_OK
from hvtsm.cli.output import table
from hvtsm.errors import HostError, TemplateError
from hvtsm.image.lab import default_agent_path, kernel_cmdline, plan_lab_image
from hvtsm.zones.libvirt.templates import (
    ACCELS,
    default_templates_dir,
    load_template,
    render,
    template_kind,
    template_names,
    template_path,
    to_xml,
    zone_params,
)

#: the interpreter the lab guest runs the agent with (in the host root, seen over 9p)
GUEST_PYTHON = "/usr/bin/python3"


def add_parsers(commands: Any) -> None:
    template = commands.add_parser("template", help="list and render libvirt domain templates",
                                   description="The libvirt domain templates of guest zones "
                                   "(domain_templates/).")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--templates-dir", metavar="DIR", type=Path,
                        help="templates directory (default: $HVTSM_TEMPLATES_DIR, else "
                        "domain_templates/ of this installation)")
    sub = template.add_subparsers(dest="template_command", metavar="SUBCOMMAND")
    sub.required = True
    listing = sub.add_parser("list", parents=[common],
                             help="list templates and check them (exit 1 if any is invalid)",
                             description="List the templates with their kind; each is loaded "
                             "and checked.")
    listing.add_argument("--json", action="store_true", help="one JSON object per template")
    listing.set_defaults(handler=cmd_list)
    rend = sub.add_parser("render", parents=[common],
                          help="print the domain XML a zone would be defined with",
                          description="Fill a template with example values derived from a "
                          "zone id (paths under /run/hvtsm/zones/ID, the lab image as "
                          "planned in the cache) and print the XML. Nothing is created.")
    rend.add_argument("name", metavar="NAME", help="template name (see `hvtsm template list`)")
    rend.add_argument("--zone-id", default="example", help="zone id the example values are "
                      "derived from (default: example)")
    rend.add_argument("--accel", choices=ACCELS, default="qemu",
                      help="kvm, or qemu for TCG (default: qemu)")
    rend.set_defaults(handler=cmd_render)


def cmd_list(args: argparse.Namespace) -> int:
    status = EXIT_OK
    rows = []
    for name in template_names(templates_dir=args.templates_dir):
        path = template_path(name, templates_dir=args.templates_dir)
        try:
            kind, error = template_kind(load_template(name, templates_dir=args.templates_dir)), None
        except TemplateError as exc:
            kind, error = None, exc.detail
            status = EXIT_INVALID
        if args.json:
            print(json.dumps({"name": name, "file": str(path), "kind": kind,
                              "valid": error is None, "error": error}))
        else:
            rows.append([name, kind or "-", "ok" if error is None else f"invalid: {error}",
                         path])
    if not args.json:
        folder = args.templates_dir or default_templates_dir()
        print(table(["NAME", "KIND", "STATUS", "FILE"], rows) if rows
              else f"no templates in {folder}")
    return status


def cmd_render(args: argparse.Namespace) -> int:
    kernel, initrd = "/boot/vmlinuz", "/var/cache/hvtsm/images/lab.cpio.gz"
    try:
        image = plan_lab_image()
        kernel, initrd = str(image.kernel), str(image.initrd)
    except HostError:
        pass  # no kernel here: the placeholders still show the shape
    cmdline = kernel_cmdline(python=GUEST_PYTHON, agent_path=default_agent_path(), ip=None,
                             gateway=None)
    params = zone_params(args.zone_id, accel=args.accel, kernel=kernel, initrd=initrd,
                         cmdline=cmdline)
    print(to_xml(render(args.name, params, templates_dir=args.templates_dir)), end="")
    return EXIT_OK
