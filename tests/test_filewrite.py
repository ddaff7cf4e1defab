"""FileWriter: restored files written past the page cache, byte for byte, on any filesystem."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgkloset_core.postgres.filewrite import ALIGN, FileWriter

SIZES = [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, 3 * ALIGN + 17, (1 << 20) - 1, 1 << 20,
         (1 << 20) + 1, 5 * (1 << 20) + 12345]


def pieces(data: bytes, step: int) -> Iterator[bytes]:
    for at in range(0, len(data), step):
        yield data[at:at + step]


def write(writer: FileWriter, path: Path, data: bytes, step: int) -> None:
    f = writer.create(path)
    try:
        for piece in pieces(data, step):
            f.write(piece)
        f.finish()
    finally:
        f.close()


def takes_direct_io(folder: Path) -> bool:
    probe = folder / ".probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600))
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
    return True


@pytest.mark.parametrize("step", [65536, 1000, 3 * (1 << 20)])
def test_files_are_written_exactly_and_mostly_direct(tmp_path: Path, step: int) -> None:
    if not takes_direct_io(tmp_path):
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT")
    writer = FileWriter(buffer_size=1 << 20)
    expected = {}
    try:
        for size in SIZES:
            data = os.urandom(size)
            path = tmp_path / f"f{size}"
            write(writer, path, data, step)
            expected[path] = data
    finally:
        writer.close()
    for path, data in expected.items():
        assert path.read_bytes() == data, path.name
        assert path.stat().st_mode & 0o777 == 0o600
    total = sum(SIZES)
    assert writer.direct_bytes + writer.cached_bytes == total
    # Only the tails (under one block per file) went through the page cache.
    assert writer.cached_bytes < len(SIZES) * ALIGN
    assert writer.direct_bytes > total - len(SIZES) * ALIGN


def test_an_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "taken"
    path.write_bytes(b"keep me")
    writer = FileWriter()
    try:
        with pytest.raises(FileExistsError):
            writer.create(path)
    finally:
        writer.close()
    assert path.read_bytes() == b"keep me"


def test_without_direct_the_same_bytes(tmp_path: Path) -> None:
    writer = FileWriter(direct=False)
    data = os.urandom(2 * (1 << 20) + 5)
    write(writer, tmp_path / "f", data, 70000)
    writer.close()
    assert (tmp_path / "f").read_bytes() == data
    assert writer.direct_bytes == 0 and writer.cached_bytes == len(data)


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    """A filesystem that refuses O_DIRECT (ramfs); mounting it needs root."""
    mount = tmp_path / "ramfs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a ramfs needs root (CI runs as root)")
    done = subprocess.run(["mount", "-t", "ramfs", "pgkloset-test", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a ramfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_filesystem_refusing_direct_io_gets_ordinary_writes(ramfs: Path) -> None:
    writer = FileWriter()
    data = os.urandom(3 * (1 << 20) + 99)
    try:
        write(writer, ramfs / "first", data, 65536)
        write(writer, ramfs / "second", data[:ALIGN * 3], 65536)
    finally:
        writer.close()
    assert (ramfs / "first").read_bytes() == data
    assert (ramfs / "second").read_bytes() == data[:ALIGN * 3]
    assert not writer.direct and writer.direct_bytes == 0
    assert sorted(p.name for p in ramfs.iterdir()) == ["first", "second"]
