"""Benign: runs a few ordinary programs as children."""

from __future__ import annotations

import subprocess

from _common import behave

behave(0.2)
words = subprocess.run(["/usr/bin/sort"], input="pear\napple\nfig\n", capture_output=True,
                       text=True, check=True).stdout.split()
echoed = subprocess.run(["/bin/echo", "hello"], capture_output=True, text=True,
                        check=True).stdout.strip()
shell = subprocess.run("echo $((6 * 7))", shell=True, capture_output=True, text=True,
                       check=True).stdout.strip()
print(f"OK children {','.join(words)} {echoed} {shell}", flush=True)
