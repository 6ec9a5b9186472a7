"""`hvtsm image build`: build (or find in the cache) the lab guest image."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hvtsm.cli.exits import EXIT_OK
from hvtsm.cli.output import say, table
from hvtsm.image.lab import LabImage, build_lab_image


def add_parsers(commands: Any) -> None:
    image = commands.add_parser("image", help="build the lab guest image",
                                description="Guest images of libvirt zones.")
    sub = image.add_subparsers(dest="image_command", metavar="SUBCOMMAND")
    sub.required = True
    build = sub.add_parser(
        "build", help="build or find the cached lab image (kernel + initramfs)",
        description="Build the lab image from the host's kernel, its modules and busybox, "
        "or find it in the cache (content-addressed: a second run does nothing). Progress "
        "goes to stderr.")
    build.add_argument("--force", action="store_true", help="rebuild even when cached")
    build.add_argument("--kernel", metavar="VERSION",
                       help="kernel version (default: the newest with /lib/modules/VERSION)")
    build.add_argument("--cache-dir", metavar="DIR", type=Path,
                       help="cache directory (default /var/cache/hvtsm/images as root, else "
                       "$XDG_CACHE_HOME/hvtsm/images)")
    build.add_argument("--json", action="store_true", help="print one JSON object")
    build.set_defaults(handler=cmd_build)


def image_dict(image: LabImage) -> dict[str, Any]:
    return {"kernel": str(image.kernel), "boot": image.boot,
            "packaged_kernel": str(image.packaged_kernel) if image.packaged_kernel else None,
            "initrd": str(image.initrd), "kernel_version": image.kernel_version,
            "digest": image.digest, "size": image.size, "cached": image.cached,
            "modules": list(image.modules)}


def cmd_build(args: argparse.Namespace) -> int:
    image = build_lab_image(cache_dir=args.cache_dir, kernel_version=args.kernel,
                            force=args.force, progress=lambda msg: say(f"hvtsm: {msg}"))
    if args.json:
        print(json.dumps(image_dict(image)))
        return EXIT_OK
    boot = (f"{image.boot}, from {image.packaged_kernel}" if image.boot == "pvh"
            else image.boot)
    print(table(["FIELD", "VALUE"], [
        ["kernel", f"{image.kernel} ({boot})"],
        ["initrd", image.initrd],
        ["version", image.kernel_version],
        ["digest", image.digest],
        ["size", f"{image.size} bytes ({image.size / 1e6:.1f} MB)"],
        ["cached", "yes" if image.cached else "no (built now)"],
        ["modules", " ".join(image.modules)],
    ]))
    return EXIT_OK
