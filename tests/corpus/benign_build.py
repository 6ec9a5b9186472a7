"""Ordinary work that must never be an anomaly: build C in the scratch directory and run
it, a Makefile, scripts written here and run, a shared library built and loaded, tar, git,
sqlite, compileall, a Python package's own tests; then data (not code) fetched and sorted.
Arguments: host port (the payload server's /data.csv). Prints OK build when all of it ran.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from _common import behave, host_address

HOST, PORT = host_address(sys.argv[1]), int(sys.argv[2])
WORK = Path(tempfile.mkdtemp(prefix="build-", dir="/tmp"))
ENV = {"PATH": "/usr/bin:/bin", "HOME": str(WORK), "GIT_AUTHOR_NAME": "zone",
       "GIT_AUTHOR_EMAIL": "zone@example.invalid", "GIT_COMMITTER_NAME": "zone",
       "GIT_COMMITTER_EMAIL": "zone@example.invalid"}


def run(*argv: str, cwd: Path = WORK) -> str:
    done = subprocess.run(argv, cwd=cwd, env=ENV, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{argv} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


behave(0.2)
(WORK / "hello.c").write_text('#include <stdio.h>\nint main(void){puts("hi-c");return 0;}\n')
run("gcc", "-O0", "-o", "hello", "hello.c")
assert run(str(WORK / "hello")).strip() == "hi-c"

(WORK / "lib.c").write_text("int answer(void){return 42;}\n")
(WORK / "Makefile").write_text("libanswer.so: lib.c\n\tgcc -shared -fPIC -o $@ $<\n")
run("make", "-s")
assert ctypes.CDLL(str(WORK / "libanswer.so")).answer() == 42

(WORK / "job.sh").write_text("#!/bin/sh\necho hi-sh\n")
(WORK / "job.sh").chmod(0o755)
assert run(str(WORK / "job.sh")).strip() == "hi-sh"
(WORK / "job.py").write_text("print('hi-py')\n")
assert run(sys.executable, str(WORK / "job.py")).strip() == "hi-py"

package = WORK / "pkg"
(package / "calc").mkdir(parents=True)
(package / "calc" / "__init__.py").write_text("def add(a, b):\n    return a + b\n")
(package / "test_calc.py").write_text(
    "import unittest\nfrom calc import add\n\n"
    "class T(unittest.TestCase):\n"
    "    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n")
run(sys.executable, "-m", "unittest", "-q", "test_calc", cwd=package)
run(sys.executable, "-m", "compileall", "-q", str(package))

run("tar", "-cf", "pkg.tar", "pkg")
(WORK / "out").mkdir()
run("tar", "-xf", "pkg.tar", "-C", "out")
assert (WORK / "out" / "pkg" / "calc" / "__init__.py").exists()

run("git", "init", "-q", "repo")
(WORK / "repo" / "README").write_text("zone\n")
run("git", "add", "README", cwd=WORK / "repo")
run("git", "commit", "-q", "-m", "first", cwd=WORK / "repo")
assert run("git", "log", "--oneline", cwd=WORK / "repo").strip().endswith("first")

run("sqlite3", str(WORK / "db.sqlite"), "create table t(x); insert into t values (7);")
assert run("sqlite3", str(WORK / "db.sqlite"), "select x from t;").strip() == "7"

with urllib.request.urlopen(f"http://{HOST}:{PORT}/data.csv", timeout=5) as answer:
    (WORK / "data.csv").write_bytes(answer.read())
rows = run("sort", "-t,", "-k2", "-n", "-r", str(WORK / "data.csv")).splitlines()
assert rows[0] == "199,39601", rows[0]
os.system(f"rm -rf {WORK}")
print("OK build", flush=True)
