"""Out of disk space during a backup: a clean error and an intact kloset.

The kloset lives on a small tmpfs (needs root, or the test is skipped); the
stream is far larger than the space.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.kloset import (
    MiB,
    SeededStream,
    assert_one_line_error,
    backup_json,
    object_names,
    seeded_bytes,
)

TMPFS_SIZE = 48 * MiB


@pytest.fixture
def tmpfs_dir(tmp_path: Path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "small-fs"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE // MiB}m", "tmpfs",
                           str(mount_point)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


@pytest.fixture
def kloset_url(tmpfs_dir: Path) -> str:
    """This module's klosets live on the small tmpfs."""
    return str(tmpfs_dir / "kloset")


def test_backup_runs_out_of_space(new_lib_kloset, run_cli, kloset_backend, tmpfs_dir, tmp_path):
    new_lib_kloset(pack_size=4 * MiB)
    earlier = seeded_bytes(31, 8 * MiB)
    earlier_id = backup_json(run_cli, "earlier", earlier)["snapshot_id"]
    indexes = object_names(kloset_backend, "index/")

    big = tmp_path / "big.bin"  # on the ordinary disk, not the tmpfs
    stream = SeededStream(32)
    with open(big, "wb") as f:
        for _ in range(128):
            f.write(stream.read(MiB))
    with open(big, "rb") as f:
        proc = run_cli("backup", "stream", "--name", "too-big", input=f, check=False)
    assert_one_line_error(proc, "no space left")
    assert proc.stdout == b""
    assert object_names(kloset_backend, "index/") == indexes
    assert list(kloset_backend.leftover_temporaries()) == []
    assert object_names(kloset_backend, "locks/") == []
    assert os.statvfs(tmpfs_dir).f_bavail * os.statvfs(tmpfs_dir).f_frsize < 8 * MiB  # it was full

    # On the same, still nearly full file system: the kloset opens and is intact.
    listed = json.loads(run_cli("snapshots", "--json").stdout)
    assert [s["id"] for s in listed] == [earlier_id]
    proc = run_cli("check", "--read-data")
    assert b"no problems found" in proc.stdout
    assert "not in the index" in proc.stderr.decode()  # the packs of the failed backup
    assert run_cli("cat", earlier_id).stdout == earlier

    # With space again, the next backup works.
    subprocess.run(["mount", "-o", f"remount,size={4 * TMPFS_SIZE // MiB}m", str(tmpfs_dir)], check=True)
    later = seeded_bytes(33, 16 * MiB)
    later_id = backup_json(run_cli, "later", later)["snapshot_id"]
    assert run_cli("cat", later_id).stdout == later
    assert run_cli("cat", earlier_id).stdout == earlier
    proc = run_cli("check", "--read-data")
    assert b"no problems found" in proc.stdout and b"problem:" not in proc.stderr


def fill(folder: Path, leave_pages: int = 0) -> Path:
    """Fill the file system, then give back ``leave_pages`` pages."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(bytes(64 * 1024))
                f.flush()
        except OSError:
            pass
    if leave_pages:
        size = filler.stat().st_size
        os.truncate(filler, size - size % 4096 - leave_pages * 4096)
    return filler


@pytest.mark.parametrize("leave_pages", [0, 1])
def test_init_on_a_full_file_system(run_cli, kloset_backend, tmpfs_dir, leave_pages) -> None:
    """No space for the key (0 pages) or for the config after the key (1 page)."""
    filler = fill(tmpfs_dir, leave_pages)
    proc = run_cli("init", check=False)
    assert_one_line_error(proc, "no space left")
    assert object_names(kloset_backend, "") == [], "a failed init must leave nothing behind"
    filler.unlink()
    run_cli("init")
    assert run_cli("snapshots").returncode == 0
