"""Binary discovery against the PostgreSQL installs on this machine (15 Debian, 16 wheel)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgkloset_core.errors import KlosetError
from pgkloset_core.postgres.binaries import (
    NoSuitableBinaries,
    PgBinaries,
    available_binaries,
    find_binaries,
    pgserver_bin_dir,
    tool_version,
)

needs_wheel = pytest.mark.skipif(pgserver_bin_dir() is None, reason="pgserver wheel not installed")


def test_finds_debian_15() -> None:
    found = find_binaries(exact_major=15, tool="postgres")
    assert found.major == 15
    assert found.version.startswith("15.")
    assert found.path("initdb").is_file()
    assert found.path("pg_dump").is_file()


@needs_wheel
def test_finds_wheel_16_and_lists_both() -> None:
    majors = {b.major for b in available_binaries()}
    assert {15, 16} <= majors
    sixteen = find_binaries(exact_major=16)
    assert sixteen.version.startswith("16.")
    assert sixteen.bin_dir == pgserver_bin_dir().resolve()  # type: ignore[union-attr]


@needs_wheel
def test_lowest_major_at_least_the_server() -> None:
    assert find_binaries(min_major=14).major == 15
    assert find_binaries(min_major=15).major == 15
    assert find_binaries(min_major=16).major == 16


@needs_wheel
def test_configured_bin_dir_wins_when_it_fits() -> None:
    wheel = pgserver_bin_dir()
    chosen = find_binaries(min_major=15, bin_dir=wheel)
    assert chosen.major == 16 and chosen.source == "configured"
    # A configured dir that does not fit is passed over, not fatal.
    assert find_binaries(exact_major=15, bin_dir=wheel).major == 15


def test_a_fitting_configured_dir_is_the_only_one_probed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each probe runs a tool (``--version``): a configured dir that fits needs no others."""
    import pgkloset_core.postgres.binaries as binaries

    debian15 = find_binaries(exact_major=15).bin_dir

    def no_search(*_args: object) -> list[PgBinaries]:
        raise AssertionError("searched the other installs")

    monkeypatch.setattr(binaries, "available_binaries", no_search)
    chosen = find_binaries(min_major=15, bin_dir=debian15)
    assert chosen.bin_dir == debian15 and chosen.source == "configured"
    monkeypatch.undo()
    # One that does not fit still leads to the search.
    assert find_binaries(exact_major=15, bin_dir=pgserver_bin_dir() or debian15).major == 15


def test_debian_wrapper_is_not_a_bin_dir() -> None:
    """/usr/bin/pg_dump is Debian's pg_wrapper; the real dirs are listed instead."""
    dirs = [b.bin_dir for b in available_binaries()]
    assert Path("/usr/bin") not in dirs
    assert len(dirs) == len(set(dirs))


def test_refuses_major_99_with_a_clear_message() -> None:
    with pytest.raises(NoSuitableBinaries) as info:
        find_binaries(min_major=99)
    message = str(info.value)
    assert isinstance(info.value, KlosetError)
    assert "99" in message
    assert "15." in message and "/usr/lib/postgresql/15/bin" in message
    assert "looked in" in message and "PATH" in message


def test_refuses_missing_configured_dir_and_tool(tmp_path: Path) -> None:
    with pytest.raises(NoSuitableBinaries, match=str(tmp_path)):
        find_binaries(exact_major=99, bin_dir=tmp_path)
    with pytest.raises(NoSuitableBinaries, match="pg_nonesuch"):
        find_binaries(exact_major=15).path("pg_nonesuch")
    with pytest.raises(NoSuitableBinaries):
        PgBinaries.from_dir(tmp_path)


def test_version_is_cached() -> None:
    exe = find_binaries(exact_major=15).path("pg_dump")
    assert tool_version(exe) == tool_version(exe)
    assert tool_version(exe)[1] == 15
