import pytest

from hvtsm.units import (
    format_cpuset,
    format_duration_ms,
    format_size,
    parse_cpuset,
    parse_duration_ms,
    parse_size,
)


@pytest.mark.parametrize(("text", "ms"), [
    ("250ms", 250), ("5s", 5000), ("1.5m", 90_000), ("2h", 7_200_000), (" 0s ", 0),
])
def test_durations(text: str, ms: int) -> None:
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize("text", ["5", "5 sec", "-1s", "s", "1d", ""])
def test_bad_durations_say_what_is_valid(text: str) -> None:
    with pytest.raises(ValueError, match="ms, s, m or h"):
        parse_duration_ms(text)


def test_duration_formatting_round_trips() -> None:
    for ms in (250, 1500, 60_000, 600_000, 7_200_000):
        assert parse_duration_ms(format_duration_ms(ms)) == ms


@pytest.mark.parametrize(("text", "size"), [
    ("512MiB", 512 * 1024**2), ("1GiB", 1024**3), ("1.5KiB", 1536), ("1000", 1000),
    (4096, 4096), ("2MB", 2_000_000),
])
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "12 parsecs", "-5MiB", True])
def test_bad_sizes(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)  # type: ignore[arg-type]


def test_format_size() -> None:
    assert format_size(512 * 1024**2) == "512MiB"
    assert format_size(100) == "100B"


def test_cpusets() -> None:
    assert parse_cpuset("0-2,5") == {0, 1, 2, 5}
    assert format_cpuset(frozenset({0, 1, 2, 5})) == "0-2,5"
    for bad in ("", "a", "3-1", "1-"):
        with pytest.raises(ValueError):
            parse_cpuset(bad)
