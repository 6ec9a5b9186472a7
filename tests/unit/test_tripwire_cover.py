"""Which files a cgroup zone's tripwire covers (hvtsm/zones/cgroup/tripwire.py), on a real
tree: the regular files the globs match, not links, not what the view replaces anyway,
bounded; and the tripwire file itself."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hvtsm.zones.cgroup import tripwire


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for rel in ("home/a/.ssh/id_rsa", "home/a/.ssh/config", "home/a/notes.txt",
                "home/b/.ssh/keys/deep", "etc/shadow", "etc/passwd"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    (tmp_path / "home/a/.ssh/link").symlink_to(tmp_path / "etc/passwd")
    return tmp_path


def test_the_matching_regular_files(tree: Path) -> None:
    found, warnings = tripwire.covered([f"{tree}/home/*/.ssh/**", f"{tree}/etc/shadow"],
                                       elsewhere=())
    assert sorted(found) == sorted(str(tree / p) for p in (
        "home/a/.ssh/id_rsa", "home/a/.ssh/config", "home/b/.ssh/keys/deep", "etc/shadow"))
    assert warnings == []


def test_what_the_view_replaces_is_not_covered(tree: Path) -> None:
    found, _ = tripwire.covered([f"{tree}/etc/shadow"], elsewhere=(f"{tree}/etc/",))
    assert found == []


def test_covering_is_bounded_and_says_so(tree: Path) -> None:
    found, warnings = tripwire.covered([f"{tree}/**"], limit=2, elsewhere=())
    assert len(found) == 2 and any("more than 2 files" in w for w in warnings)


def test_the_tripwire_is_empty_root_owned_and_openable(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tripwire, "TRIPWIRE_DIR", tmp_path / "wires")
    path = tripwire.make("z0123abcd")
    assert path.read_bytes() == b"" and oct(path.stat().st_mode & 0o777) == "0o444"
    assert oct(os.stat(tmp_path / "wires").st_mode & 0o777) == "0o700"
    assert tripwire.zone_ids() == {"z0123abcd"}
    assert tripwire.remove("z0123abcd") == [f"tripwire {path}"]
    assert tripwire.remove("z0123abcd") == [] and tripwire.zone_ids() == set()
