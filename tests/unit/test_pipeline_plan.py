"""Planning a pipeline: segments grouped by analysis, policies by selector, grants checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hvtsm.agent_stage import stage_program
from hvtsm.errors import AnalysisError, PipelineError, PolicyError, ZoneError
from hvtsm.pipeline.plan import plan_manifest, plan_python, role_of
from hvtsm.pipeline.runner import first_arguments, stage_argv
from hvtsm.policy import parse_policy
from hvtsm.policy.catalog import load_referenced

ROOT = Path(__file__).resolve().parents[2]
READINGS = ROOT / "tests" / "pipeline_samples" / "readings.py"

PIPELINE_HEAD = b"""name = "p"
[[phase]]
at = "0s"
network = "none"
[[phase]]
at = "30s"
action = "terminate"
[[segment]]
match = { role = "fetch" }
policy = "segment-fetch"
lifespan_scale = 0.5
"""


def pipeline_policy(grants: list[tuple[str, str]], tmp_path: Path) -> object:
    text = PIPELINE_HEAD + b"".join(
        f'[[channel]]\nfrom = "{a}"\nto = "{b}"\n'.encode() for a, b in grants)
    path = tmp_path / "p.toml"
    path.write_bytes(text)
    return parse_policy(text, source=str(path))


def test_readings_splits_into_fetch_parse_compute() -> None:
    plan = plan_python(READINGS, load_referenced("pipeline", beside=None, field="policy"))
    assert [(s.name, s.role, s.functions) for s in plan.stages] == [
        ("fetch", "fetch", ("fetch",)), ("parse", "parse", ("parse",)),
        ("compute", "compute", ("summarize",))]
    fetch, parse, compute = plan.stages
    assert fetch.policy.name == "segment-fetch" and fetch.lifespan_ms == 30_000
    assert parse.policy.name == "segment-parse" and parse.lifespan_ms == 10_000
    # the parse zone has no network from its first instruction
    assert str(parse.policy.initial().network) == "none"
    assert str(compute.policy.initial().network) == "none"
    assert str(fetch.policy.initial().network) == "full"
    # gateway(), which fetch calls, uses the socket module (line 24)
    assert {(r.capability, r.line) for r in fetch.reasons} == {("network", 31),
                                                               ("network", 24)}
    assert plan.params == ("port",) and plan.first_args == ("port",)
    assert plan.program_digest is not None


def test_consecutive_steps_of_one_role_share_a_zone(tmp_path: Path) -> None:
    program = tmp_path / "chain.py"
    program.write_text(
        "import json, urllib.request\n"
        "def get(u):\n    return urllib.request.urlopen(u).read()\n"
        "def get_more(b):\n    return urllib.request.urlopen(b).read()\n"
        "def load(b):\n    return json.loads(b)\n"
        "def add(d):\n    return sum(d)\n"
        "def double(n):\n    return 2 * n\n"
        "def main(url):\n"
        "    a = get(url)\n    b = get_more(a)\n    c = load(b)\n    d = add(c)\n"
        "    return double(d)\n")
    plan = plan_python(program, pipeline_policy([("fetch", "parse"), ("parse", "compute")],
                                                 tmp_path))
    assert [(s.name, s.functions) for s in plan.stages] == [
        ("fetch", ("get", "get_more")), ("parse", ("load",)), ("compute", ("add", "double"))]
    # fetch matched the selector (its policy, half its lifespan); the others no selector
    assert plan.stages[0].policy.name == "segment-fetch" and plan.stages[0].scale == 0.5
    assert plan.stages[1].policy.name == "p" and plan.stages[1].chosen_by == "pipeline policy"


def test_a_step_that_reaches_the_network_through_a_helper_is_a_fetch(tmp_path: Path) -> None:
    """The step's own body has no network call: its helper does, and the zone the step
    gets must have network (without the helper's evidence it would be a compute stage
    with no network, and fail)."""
    program = tmp_path / "helped.py"
    program.write_text(
        "import json, urllib.request\n"
        "class Client:\n"
        "    def get(self, u):\n        return urllib.request.urlopen(u).read()\n"
        "def download(u):\n    return Client().get(u)\n"
        "def fetch(u):\n    return download(u)\n"
        "def decode(b):\n    return json.loads(b)\n"
        "def main(url):\n    a = fetch(url)\n    return decode(a)\n"
        "if __name__ == '__main__':\n    main('http://x')\n")
    plan = plan_python(program, pipeline_policy([("fetch", "parse")], tmp_path))
    assert [(s.name, s.functions) for s in plan.stages] == [("fetch", ("fetch",)),
                                                           ("parse", ("decode",))]
    assert str(plan.stages[0].policy.initial().network) == "full"
    [why] = plan.stages[0].reasons
    assert (why.line, why.detail) == (4, "urllib.request.urlopen() via download() -> get()")
    # the script's own run of main() is not part of what every zone loads
    assert plan.stages[1].capabilities == {"input-parsing"}


def test_local_modules_go_with_the_program_and_are_checked(tmp_path: Path) -> None:
    """A step whose network is in a module beside the program is a fetch; the snapshot the
    zones run holds that module too, and a module changed after the analysis stops it."""
    (tmp_path / "helpers.py").write_text(
        "import urllib.request\n"
        "def download(url):\n    return urllib.request.urlopen(url).read()\n")
    program = tmp_path / "job.py"
    program.write_text("import helpers\n"
                       "def fetch(url):\n    return helpers.download(url)\n"
                       "def count(data):\n    return len(data)\n"
                       "def main(url):\n    a = fetch(url)\n    return count(a)\n")
    plan = plan_python(program, pipeline_policy([("fetch", "compute")], tmp_path))
    assert [s.role for s in plan.stages] == ["fetch", "compute"]
    assert plan.local_files == ("helpers.py",)
    staged = stage_program(plan.program, expect=plan.program_digest,
                           local_files=plan.local_files)
    assert staged.name == "job.py" and staged.read_bytes() == program.read_bytes()
    assert (staged.parent / "helpers.py").read_bytes() == (tmp_path / "helpers.py").read_bytes()
    assert oct(staged.parent.stat().st_mode & 0o777) == "0o755"
    (tmp_path / "helpers.py").write_text("def download(url):\n    return b'other'\n")
    with pytest.raises(ZoneError, match="changed after it was analyzed"):
        stage_program(plan.program, expect=plan.program_digest, local_files=plan.local_files)


def test_a_role_that_comes_back_gets_a_numbered_stage(tmp_path: Path) -> None:
    program = tmp_path / "twice.py"
    program.write_text("import json\n"
                       "def a(x):\n    return json.loads(x)\n"
                       "def b(x):\n    return x\n"
                       "def c(x):\n    return json.loads(x)\n"
                       "def main(x):\n    y = a(x)\n    z = b(y)\n    return c(z)\n")
    plan = plan_python(program, pipeline_policy(
        [("parse", "compute"), ("compute", "parse-2")], tmp_path))
    assert [s.name for s in plan.stages] == ["parse", "compute", "parse-2"]


def test_a_missing_grant_is_refused_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as caught:
        plan_python(READINGS, pipeline_policy([("fetch", "parse")], tmp_path))
    assert caught.value.field == "channel"
    assert caught.value.file == str(tmp_path / "p.toml")
    assert "parse -> compute" in str(caught.value)


@pytest.mark.parametrize(("body", "line", "words"), [
    ("    a = helper(x)\n    print(a)\n", 6, "print() is not a function defined"),
    ("    a = helper(x)\n    b = helper(x)\n", 6, "exactly the previous step's result"),
    ("    if x:\n        return helper(x)\n", 5, "If statement is not a step"),
    ("    a = helper(x + 1)\n", 5, "must be plain names"),
    ("    a = helper(y)\n", 5, "parameters, not 'y'"),
])
def test_an_entry_that_is_not_a_chain_names_its_line(tmp_path: Path, body: str, line: int,
                                                     words: str) -> None:
    program = tmp_path / "odd.py"
    program.write_text("def helper(v):\n    return v\n\ndef main(x):\n" + body)
    with pytest.raises(AnalysisError) as caught:
        plan_python(program, pipeline_policy([], tmp_path))
    assert caught.value.line == line and caught.value.file == str(program)
    assert words in str(caught.value)


def test_no_entry_function(tmp_path: Path) -> None:
    program = tmp_path / "flat.py"
    program.write_text("print(1)\n")
    with pytest.raises(AnalysisError, match="no module-level function 'main'"):
        plan_python(program, pipeline_policy([], tmp_path))


def test_manifest_names_segments_explicitly(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_bytes(PIPELINE_HEAD + b'[[channel]]\nfrom = "download"\n'
                                      b'to = "sorter"\n')
    manifest = tmp_path / "m.toml"
    manifest.write_text(f'name = "m"\nprogram = "{READINGS}"\npolicy = "p.toml"\n'
                        '[[segment]]\nname = "download"\nfunctions = ["fetch"]\n'
                        '[[segment]]\nname = "sorter"\ncommand = ["sort", "-u"]\n'
                        'role = "fetch"\nlifespan_scale = 0.1\n')
    plan = plan_manifest(manifest)
    download, sorter = plan.stages
    assert download.role == "fetch" and download.policy.name == "segment-fetch"
    assert sorter.command == ("sort", "-u") and sorter.scale == 0.1
    assert plan.policy.name == "p"
    argv = stage_argv(plan, 1, [])
    assert argv[argv.index("--recv-from") + 1] == "download"
    assert argv[-3:] == ["--", "sort", "-u"]


@pytest.mark.parametrize(("text", "field"), [
    ('policy = "pipeline"\nbogus = 1\n', "bogus"),
    ('policy = "pipeline"\n', "segment"),
    ('policy = "pipeline"\n[[segment]]\nname = "a"\n', "segment[0]"),
    ('policy = "pipeline"\n[[segment]]\nname = "a b"\ncommand = ["true"]\n',
     "segment[0].name"),
    ('policy = "pipeline"\n[[segment]]\nname = "a"\nfunctions = ["f"]\n',
     "segment[0].functions"),
    ('policy = "pipeline"\n[[segment]]\nname = "a"\ncommand = ["true"]\n'
     'lifespan_scale = 0\n', "segment[0].lifespan_scale"),
])
def test_bad_manifests_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    manifest = tmp_path / "m.toml"
    manifest.write_text(text)
    with pytest.raises(PipelineError) as caught:
        plan_manifest(manifest)
    assert caught.value.field == field and caught.value.file == str(manifest)


def test_arguments_fill_the_entry_parameters() -> None:
    plan = plan_python(READINGS, load_referenced("pipeline", beside=None, field="policy"))
    assert first_arguments(plan, ["8080"]) == ["8080"]
    with pytest.raises(PipelineError, match="takes 1 argument"):
        first_arguments(plan, [])
    argv = stage_argv(plan, 0, ["8080"])
    assert json.loads(argv[argv.index("--args") + 1]) == ["8080"]
    assert "--recv-from" not in argv and argv[argv.index("--send-to") + 1] == "parse"


def test_roles() -> None:
    assert role_of(frozenset({"network", "input-parsing"})) == "fetch"
    assert role_of(frozenset({"input-parsing", "exec"})) == "parse"
    assert role_of(frozenset({"file-write"})) == "store"
    assert role_of(frozenset()) == "compute"


def test_cli_plan_and_bad_program(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "hvtsm.cli.main", "pipeline", "--plan",
                           "--json", str(READINGS)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert [s["policy"] for s in json.loads(done.stdout)["stages"]] == [
        "segment-fetch", "segment-parse", "segment-compute"]
    broken = tmp_path / "broken.py"
    broken.write_text("def main(:\n")
    done = subprocess.run([sys.executable, "-m", "hvtsm.cli.main", "pipeline", str(broken)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 1 and f"{broken}:1" in done.stderr
