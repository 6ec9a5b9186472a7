"""hvtsm analyze: capabilities per segment, with the exact file:line of every reason."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from hvtsm.analysis import analyze, risk_of
from hvtsm.analysis.model import Report
from hvtsm.errors import AnalysisError

SAMPLES = Path(__file__).resolve().parents[1] / "analysis_samples"
ROOT = Path(__file__).resolve().parents[2]


def where(report: Report, segment: str) -> set[tuple[str, int, str]]:
    """(file name, line, capability) of each reason of one segment."""
    return {(Path(r.file).name, r.line, r.capability)
            for r in report.segment(segment).reasons}


def caps(report: Report, segment: str) -> set[str]:
    return set(report.segment(segment).capabilities)


def test_scraper_network_parsing_and_writes() -> None:
    report = analyze(SAMPLES / "scraper.py")
    assert report.language == "python"
    assert [s.name for s in report.segments] == [
        "scraper", "scraper.fetch", "scraper.save", "scraper.crawl", "scraper.slug"]
    assert caps(report, "scraper.fetch") == {"network", "input-parsing"}
    assert where(report, "scraper.fetch") == {("scraper.py", 12, "network"),
                                              ("scraper.py", 14, "input-parsing")}
    assert where(report, "scraper.save") == {("scraper.py", 18, "file-write")}
    # crawl does what it calls, too: the evidence stays where it is, and says the way
    assert where(report, "scraper.crawl") == {("scraper.py", 25, "file-write"),
                                              ("scraper.py", 12, "network"),
                                              ("scraper.py", 14, "input-parsing"),
                                              ("scraper.py", 18, "file-write")}
    crawl = report.segment("scraper.crawl")
    assert {r.detail for r in crawl.reasons if r.line in (12, 18)} == {
        "requests.get() via fetch()", "open(mode='w') via save()"}
    assert caps(report, "scraper.slug") == set()
    assert caps(report, "scraper") == set()
    fetch = report.segment("scraper.fetch")
    assert (fetch.kind, fetch.line, fetch.risk) == ("function", 11, "medium")


def test_worker_exec_and_pickle() -> None:
    report = analyze(SAMPLES / "worker.py")
    assert where(report, "worker.Worker.load") == {("worker.py", 17, "dynamic-code")}
    assert where(report, "worker.Worker.run") == {("worker.py", 20, "exec"),
                                                  ("worker.py", 21, "file-write")}
    assert where(report, "worker.main") == {("worker.py", 29, "exec")}
    assert caps(report, "worker.Worker.__init__") == set()
    assert report.segment("worker.Worker.run").risk == "high"
    # opening for reading ("rb") is not a write
    assert "file-write" not in caps(report, "worker.Worker.load")


def test_pure_compute_is_low() -> None:
    report = analyze(SAMPLES / "compute.py")
    assert all(s.capabilities == frozenset() and s.risk == "low" for s in report.segments)
    assert report.segment("compute.Matrix.transpose").line == 28


def test_ctypes_native_ptrace_privileged() -> None:
    report = analyze(SAMPLES / "native_tracer.py")
    assert ("native_tracer.py", 3, "native") in where(report, "native_tracer")
    assert ("native_tracer.py", 6, "native") in where(report, "native_tracer")
    assert caps(report, "native_tracer.attach") == {"native", "ptrace"}
    assert ("native_tracer.py", 12, "ptrace") in where(report, "native_tracer.attach")
    assert ("native_tracer.py", 17, "privileged") in where(report, "native_tracer.bind_mount")
    assert where(report, "native_tracer.drop_to") == {("native_tracer.py", 22, "privileged")}


def test_aliases_and_from_imports_are_resolved() -> None:
    report = analyze(SAMPLES / "aliased.py")
    assert where(report, "aliased.run_all") == {("aliased.py", 13, "exec"),
                                                ("aliased.py", 14, "exec")}
    assert where(report, "aliased.cleanup") == {("aliased.py", 18, "file-write")}
    assert where(report, "aliased.download") == {("aliased.py", 22, "network")}
    assert where(report, "aliased.parse") == {("aliased.py", 26, "input-parsing")}
    assert where(report, "aliased.plugin") == {("aliased.py", 30, "dynamic-code")}
    # a constant module name is an ordinary import
    assert caps(report, "aliased.fixed_plugin") == set()
    assert where(report, "aliased.calc") == {("aliased.py", 38, "dynamic-code")}
    details = {r.detail for s in report.segments for r in s.reasons}
    assert "subprocess.check_call()" in details and "os.system()" in details


def test_shell_deploy_script() -> None:
    report = analyze(SAMPLES / "deploy.sh")
    assert report.language == "shell"
    (script,) = report.segments
    assert (script.name, script.kind, script.risk) == ("deploy.sh", "script", "high")
    assert where(report, "deploy.sh") == {
        ("deploy.sh", 8, "network"),
        ("deploy.sh", 9, "file-write"),   # >> /var/log/deploy.log
        ("deploy.sh", 10, "file-write"),  # rm; mv
        ("deploy.sh", 11, "file-write"),  # > VERSION (2>/dev/null is not a write)
        ("deploy.sh", 12, "exec"),        # sh -c
        ("deploy.sh", 13, "network"),
        ("deploy.sh", 13, "exec"),        # curl ... | bash
        ("deploy.sh", 14, "file-write"),  # cat <<EOF > /etc/app.conf; its body is not read
    }
    details = [r.detail for r in script.reasons]
    assert "rm -rf $DEST.old" in details and "mv $DEST $DEST.old" in details


def test_shell_substitution_comments_and_continuations(tmp_path: Path) -> None:
    script = tmp_path / "s.sh"
    script.write_text("# curl in a comment is not a command\n"
                      "x=$(wget -qO- http://example.com)\n"
                      "echo a \\\n"
                      "  | xargs rm\n"
                      'echo "it\'s # not a comment" && eval "$CMD"\n'
                      'source "$PLUGIN"\n'
                      "source ./fixed.sh\n")
    report = analyze(script)
    assert where(report, "s.sh") == {("s.sh", 2, "network"), ("s.sh", 3, "exec"),
                                     ("s.sh", 3, "file-write"), ("s.sh", 5, "exec"),
                                     ("s.sh", 6, "exec")}


def test_broken_python_names_file_and_line() -> None:
    with pytest.raises(AnalysisError) as err:
        analyze(SAMPLES / "broken.py")
    assert err.value.file is not None and err.value.file.endswith("broken.py")
    assert err.value.line == 8
    assert "broken.py:8" in str(err.value)


@pytest.mark.parametrize("content, name", [
    (b"\x00\x01\x02binary junk", "blob.bin"),
    (b"just some text\n", "notes.txt"),
    (b"#!/usr/bin/perl\nprint 1;\n", "tool"),
])
def test_unknown_format(tmp_path: Path, content: bytes, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(AnalysisError, match="unknown format"):
        analyze(path)


def test_unreadable_and_missing(tmp_path: Path) -> None:
    with pytest.raises(AnalysisError, match="cannot read"):
        analyze(tmp_path / "missing.py")
    with pytest.raises(AnalysisError, match="directory"):
        analyze(tmp_path)


def test_content_decides_not_the_name(tmp_path: Path) -> None:
    tool = tmp_path / "tool"
    tool.write_text("#!/usr/bin/env python3\nimport os\nos.system('id')\n")
    assert analyze(tool).language == "python"
    assert where(analyze(tool), "tool") == {("tool", 3, "exec")}
    fake = tmp_path / "fake.py"
    fake.write_text("#!/bin/sh\ncurl http://x\n")
    assert analyze(fake).language == "shell"


@pytest.mark.parametrize("binary", ["/bin/ls", sys.executable])
def test_real_elf_binaries(binary: str) -> None:
    real = os.path.realpath(binary)
    report = analyze(real)
    (segment,) = report.segments
    assert (report.language, segment.kind, segment.line) == ("elf", "binary", 0)
    assert all(r.line == 0 for r in segment.reasons)


def test_python_interpreter_binary_imports() -> None:
    report = analyze(os.path.realpath("/usr/bin/python3"))
    segment = report.segments[0]
    assert {"exec", "network", "native"} <= segment.capabilities
    assert {"execv", "dlopen", "connect"} <= {r.detail for r in segment.reasons}
    assert segment.risk == "high"


def test_ls_imports_are_read() -> None:
    from hvtsm.analysis.elf import imported_symbols
    names = imported_symbols(Path("/bin/ls").read_bytes(), "/bin/ls")
    assert "opendir" in names or "fts_open" in names or "readdir" in names


@pytest.mark.parametrize("size", [10, 64, 4096, 100_000])
def test_truncated_elf(tmp_path: Path, size: int) -> None:
    cut = tmp_path / "cut"
    cut.write_bytes(Path(os.path.realpath("/usr/bin/python3")).read_bytes()[:size])
    with pytest.raises(AnalysisError):
        analyze(cut)


def test_risk_levels() -> None:
    assert risk_of(frozenset()) == "low"
    assert risk_of(frozenset({"network"})) == "medium"
    assert risk_of(frozenset({"input-parsing"})) == "medium"
    assert risk_of(frozenset({"network", "file-write"})) == "high"
    assert risk_of(frozenset({"exec"})) == "high"
    assert risk_of(frozenset({"dynamic-code", "network"})) == "high"


def test_json_round_trip() -> None:
    data = json.loads(analyze(SAMPLES / "worker.py").to_json())
    seg = next(s for s in data["segments"] if s["name"] == "worker.Worker.run")
    assert seg["capabilities"] == ["exec", "file-write"]
    assert seg["reasons"][0]["line"] == 20


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "hvtsm.cli.main", "analyze", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


def test_cli_json() -> None:
    done = _cli(str(SAMPLES / "scraper.py"), "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    fetch = next(s for s in data["segments"] if s["name"] == "scraper.fetch")
    assert fetch["capabilities"] == ["input-parsing", "network"]
    assert {(r["line"], r["capability"]) for r in fetch["reasons"]} == {
        (12, "network"), (14, "input-parsing")}


def test_cli_table() -> None:
    done = _cli(str(SAMPLES / "deploy.sh"))
    assert done.returncode == 0, done.stderr
    assert "SEGMENT" in done.stdout and "deploy.sh:12 exec sh -c" in done.stdout


def test_cli_broken_file_exit_1() -> None:
    done = _cli(str(SAMPLES / "broken.py"), "--json")
    assert done.returncode == 1
    assert done.stdout == ""
    assert "broken.py:8" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(shutil.which("ls") is None, reason="no ls")
def test_cli_elf() -> None:
    done = _cli("/bin/ls", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["language"] == "elf"


def test_damaged_elf_never_raises_anything_else(tmp_path: Path) -> None:
    original = Path("/bin/ls").read_bytes()
    rng = random.Random(7)
    damaged = tmp_path / "damaged"
    for _ in range(300):
        data = bytearray(original)
        # flips in the ELF header and the section headers, where the offsets live
        for _ in range(rng.randint(1, 8)):
            spot = rng.choice([rng.randrange(4, 64), rng.randrange(len(data) - 4096, len(data))])
            data[spot] = rng.randrange(256)
        damaged.write_bytes(bytes(data))
        with contextlib.suppress(AnalysisError):
            analyze(damaged)


@pytest.mark.parametrize("content", [b"x = 1\x00\n", b"\xff\xfe not utf-8", b"(" * 1000])
def test_odd_python_is_an_analysis_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "odd.py"
    path.write_bytes(content)
    with pytest.raises(AnalysisError):
        analyze(path)


def test_empty_python_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.py"
    path.write_text("")
    report = analyze(path)
    assert [(s.name, s.kind, s.risk) for s in report.segments] == [("empty", "module", "low")]


def _tiny_elf(is64: bool, little: bool, symbols: list[tuple[str, int]]) -> bytes:
    """An ELF with only a null section, .dynstr and .dynsym: (name, st_shndx) per symbol."""
    end = "<" if little else ">"
    strtab = b"\0" + b"".join(name.encode() + b"\0" for name, _ in symbols)
    sym_fmt = end + ("IBBHQQ" if is64 else "IIIBBH")
    syms = [b"\0" * struct.calcsize(sym_fmt)]
    offset = 1
    for name, shndx in symbols:
        if is64:
            syms.append(struct.pack(sym_fmt, offset, 0x12, 0, shndx, 0, 0))
        else:
            syms.append(struct.pack(sym_fmt, offset, 0, 0, 0x12, 0, shndx))
        offset += len(name) + 1
    symtab = b"".join(syms)
    eh_size = 64 if is64 else 52
    sh_fmt = end + ("IIQQQQIIQQ" if is64 else "IIIIIIIIII")
    sh_size = struct.calcsize(sh_fmt)
    str_off = eh_size
    sym_off = str_off + len(strtab)
    sh_off = sym_off + len(symtab)
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1 if little else 2, 1]) + b"\0" * 9
    head_fmt = end + ("HHIQQQIHHHHHH" if is64 else "HHIIIIIHHHHHH")
    header = ident + struct.pack(head_fmt, 3, 62 if is64 else 3, 1, 0, 0, sh_off, 0, eh_size,
                                 0, 0, sh_size, 3, 0)
    sections = [struct.pack(sh_fmt, *[0] * 10),
                struct.pack(sh_fmt, 0, 3, 0, 0, str_off, len(strtab), 0, 0, 1, 0),
                struct.pack(sh_fmt, 0, 11, 0, 0, sym_off, len(symtab), 1, 1, 8,
                            struct.calcsize(sym_fmt))]
    return header + strtab + symtab + b"".join(sections)


@pytest.mark.parametrize("is64", [True, False])
@pytest.mark.parametrize("little", [True, False])
def test_elf_classes_and_byte_orders(tmp_path: Path, is64: bool, little: bool) -> None:
    path = tmp_path / "tiny"
    # st_shndx 0 is an import; 12 is defined here, so `ptrace` must not count
    path.write_bytes(_tiny_elf(is64, little, [("execve", 0), ("dlopen", 0), ("printf", 0),
                                              ("ptrace", 12)]))
    (segment,) = analyze(path).segments
    assert {r.detail for r in segment.reasons} == {"execve", "dlopen"}
    assert segment.capabilities == {"exec", "native"}
    path.write_bytes(path.read_bytes()[:-10])  # cuts into the last section header
    with pytest.raises(AnalysisError, match="truncated"):
        analyze(path)


def test_programs_the_code_runs(tmp_path: Path) -> None:
    """What a transient zone's trigger compares an exec with: programs named literally."""
    deploy = analyze(SAMPLES / "deploy.sh")
    # builtins (set, echo) and redirect targets are not programs; `sh -c "..."` is read too
    assert deploy.programs() == ("bash", "cat", "curl", "date", "ls", "mv", "rm", "sh",
                                 "systemctl", "tar")
    assert "*/curl" in deploy.exec_globs()
    script = tmp_path / "funcs.sh"
    script.write_text("#!/bin/sh\nhelper() {\n  /usr/bin/sort -u\n}\nhelper\n"
                      "exec /bin/sleep 1\n$CMD --flag\n")
    assert analyze(script).programs() == ("/bin/sleep", "/usr/bin/sort")
    assert analyze(script).exec_globs() == ("/bin/sleep", "/usr/bin/sort")
    program = tmp_path / "runs.py"
    program.write_text("import os, subprocess\n"
                       "def a():\n    subprocess.run(['/usr/bin/git', 'pull'])\n"
                       "def b():\n    os.system('tar -xf x.tar')\n"
                       "def c(argv):\n    subprocess.run(argv)\n"
                       "def d():\n    subprocess.check_output('ls -l', shell=True)\n"
                       "def e():\n    os.execv('/bin/true', ['true'])\n")
    report = analyze(program)
    assert report.segment("runs.a").programs == ("/usr/bin/git",)
    assert report.segment("runs.b").programs == ("sh", "tar")
    assert report.segment("runs.c").programs == ()  # computed: unknown until it runs
    assert report.segment("runs.d").programs == ("ls", "sh")
    assert report.segment("runs.e").programs == ("/bin/true",)
    assert report.to_dict()["segments"][1]["programs"] == ["/usr/bin/git"]


def test_command_exec_globs(tmp_path: Path) -> None:
    from hvtsm.analysis import command_exec_globs

    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\nsort -u x\n/bin/sleep 1\n")
    script.chmod(0o755)
    assert command_exec_globs(["sh", str(script)]) == ("*/sort", "/bin/sleep")
    assert command_exec_globs([str(script), "arg"]) == ("*/sort", "/bin/sleep")
    program = tmp_path / "job.py"
    program.write_text("import subprocess\nsubprocess.run(['/usr/bin/git', 'pull'])\n")
    assert command_exec_globs(["python3", "-u", str(program)]) == ("/usr/bin/git",)
    assert command_exec_globs(["/bin/true"]) == ()  # a binary names no programs
    assert command_exec_globs(["sh", "-c", "ls -l | sort; echo x"]) == ("*/ls", "*/sort")
    assert command_exec_globs(["python3", "-c", "print(1)"]) == ()  # no script file
    broken = tmp_path / "broken.py"
    broken.write_text("def (:\n")
    assert command_exec_globs(["python3", str(broken)]) == ()


def test_calls_carry_what_the_callee_does(tmp_path: Path) -> None:
    """Through helpers, methods (self.m(), C.m()), constructors and chains of calls;
    recursion ends; an imported name that shadows nothing of the file is not followed."""
    src = tmp_path / "chain.py"
    src.write_text(
        "import subprocess\n"              # 1
        "from os import system\n"          # 2
        "def low():\n"                     # 3
        "    subprocess.run(['ls'])\n"     # 4
        "def mid():\n"                     # 5
        "    low()\n"                      # 6
        "def top():\n"                     # 7
        "    return mid()\n"               # 8
        "def again(n):\n"                  # 9
        "    return again(n - 1) if n else low()\n"  # 10
        "def pure():\n"                    # 11
        "    return system\n"              # 12
        "class Box:\n"                     # 13
        "    def __init__(self):\n"        # 14
        "        open('f', 'w')\n"         # 15
        "    def go(self):\n"              # 16
        "        self.deep()\n"            # 17
        "    def deep(self):\n"            # 18
        "        eval('1')\n"              # 19
        "def make():\n"                    # 20
        "    return Box()\n"               # 21
        "def call_method():\n"             # 22
        "    Box.go(None)\n"               # 23
        "top()\n"                          # 24
        "if __name__ == '__main__':\n"     # 25
        "    make()\n")                    # 26
    report = analyze(src)
    assert where(report, "chain.top") == {("chain.py", 4, "exec")}
    [reason] = report.segment("chain.top").reasons
    assert reason.detail == "subprocess.run() via mid() -> low()"
    assert report.segment("chain.top").programs == ("ls",)
    assert where(report, "chain.again") == {("chain.py", 4, "exec")}
    assert caps(report, "chain.pure") == set()
    assert where(report, "chain.Box.go") == {("chain.py", 19, "dynamic-code")}
    assert where(report, "chain.make") == {("chain.py", 15, "file-write")}
    assert report.segment("chain.make").reasons[0].detail == "open(mode='w') via Box()"
    assert where(report, "chain.call_method") == {("chain.py", 19, "dynamic-code")}
    # module-level code runs top(); make() only when run as a script
    assert where(report, "chain") == {("chain.py", 4, "exec")}


def local_program(tmp_path: Path) -> Path:
    """A program whose helpers live beside it: a module and a package with a relative
    import; `json` and `urllib` are the installed library's, not local."""
    (tmp_path / "helpers.py").write_text(
        "import urllib.request\n"                      # 1
        "def download(url):\n"                         # 2
        "    return urllib.request.urlopen(url).read()\n")  # 3
    pkg = tmp_path / "tools"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "disk.py").write_text(
        "from . import names\n"                        # 1
        "def keep(data):\n"                            # 2
        "    open(names.target(), 'wb').write(data)\n")  # 3
    (pkg / "names.py").write_text("def target():\n    return 'out.bin'\n")
    (tmp_path / "unused.py").write_text("import os\nos.system('x')\n")
    program = tmp_path / "job.py"
    program.write_text(
        "import json\n"                                # 1
        "import helpers\n"                             # 2
        "from tools.disk import keep\n"                # 3
        "def fetch(url):\n"                            # 4
        "    return helpers.download(url)\n"           # 5
        "def store(data):\n"                           # 6
        "    keep(data)\n"                             # 7
        "def main(url):\n"                             # 8
        "    a = fetch(url)\n"                         # 9
        "    return store(a)\n")                       # 10
    return program


def test_local_modules_are_analyzed_with_the_program(tmp_path: Path) -> None:
    report = analyze(local_program(tmp_path))
    assert set(report.local_files) == {"helpers.py", "tools/__init__.py", "tools/disk.py",
                                       "tools/names.py"}  # not unused.py, not json
    names = [s.name for s in report.segments]
    assert names[:4] == ["job", "job.fetch", "job.store", "job.main"]
    assert {"helpers.download", "tools.disk.keep", "tools.names.target"} <= set(names)
    [why] = report.segment("job.fetch").reasons
    assert (why.capability, Path(why.file).name, why.line) == ("network", "helpers.py", 3)
    assert why.detail == "urllib.request.urlopen() via helpers.download()"
    [why] = report.segment("job.store").reasons
    assert (why.capability, Path(why.file).name, why.line) == ("file-write", "disk.py", 3)
    assert why.detail == "open(mode='wb') via tools.disk.keep()"
    assert caps(report, "job.main") == {"network", "file-write"}
    assert report.to_dict()["local_files"] == list(report.local_files)


def test_a_broken_local_module_is_named(tmp_path: Path) -> None:
    program = local_program(tmp_path)
    (tmp_path / "helpers.py").write_text("def download(url:\n")
    with pytest.raises(AnalysisError) as info:
        analyze(program)
    assert info.value.file == str(tmp_path / "helpers.py") and info.value.line == 1
