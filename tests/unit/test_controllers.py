import subprocess
from pathlib import Path

from hvtsm.controllers import claim_zone, process_start_time, release_zone, zone_owner_alive


def test_own_claim_is_alive_until_released(tmp_path: Path) -> None:
    claim_zone("zabc", root=tmp_path)
    assert zone_owner_alive("zabc", root=tmp_path)
    release_zone("zabc", root=tmp_path)
    assert not zone_owner_alive("zabc", root=tmp_path)


def test_claim_of_a_dead_process_is_not_alive(tmp_path: Path) -> None:
    proc = subprocess.Popen(["true"])
    start = process_start_time(proc.pid)
    proc.wait()
    (tmp_path / "zdead").write_text(f"{proc.pid} {start}\n")
    assert not zone_owner_alive("zdead", root=tmp_path)
    assert not zone_owner_alive("znever", root=tmp_path)


def test_process_start_time_handles_odd_names() -> None:
    assert process_start_time(1) is not None
    assert process_start_time(2**22 + 7) is None
