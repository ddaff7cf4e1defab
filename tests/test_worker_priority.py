"""A backup's worker threads can yield the CPU to pg_dump and the database.

With ``PGKLOSET_WORKER_NICE=N`` (default 0: off) the seal workers and the
uploader run N nicer than the process; the thread reading the stream keeps
the process's priority, and so does everything the process starts. Observed
from outside, in /proc, on a real ``pgkloset backup stream`` held open
mid-stream.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.fixtures.kloset import CLI, MiB, seeded_bytes

BASE = os.getpriority(os.PRIO_PROCESS, 0)  # a CI runner may itself run niced
pytestmark = [
    pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc"),
    pytest.mark.skipif(BASE > 4, reason="running niced above 4: no room to see workers lowered"),
]


def thread_nices(pid: int) -> dict[int, int]:
    """Each thread of ``pid``: its nice value (field 19 of /proc/PID/task/TID/stat)."""
    nices = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        nices[int(tid)] = int(stat.rsplit(")", 1)[1].split()[16])
    return nices


def nices_mid_stream(popen_cli, ready, env_extra: dict[str, str | None] | None = None,
                     command: list[str] | None = None) -> tuple[int, dict[int, int]]:
    """Start a stream backup, feed it more than a pack, and read its threads'
    nice values while it waits for more (once ``ready(nices)``, or after 60 s);
    then let it finish. Returns (pid, tid -> nice)."""
    backup = popen_cli("backup", "stream", "--name", "held.bin", env_extra=env_extra,
                       command=command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    # 40 MiB of random data: the workers seal it and the first 32 MiB pack uploads.
    backup.stdin.write(seeded_bytes(7, 40 * MiB))
    backup.stdin.flush()
    deadline = time.monotonic() + 60
    nices = thread_nices(backup.pid)
    while not ready(nices) and time.monotonic() < deadline:
        time.sleep(0.05)
        nices = thread_nices(backup.pid)
    backup.stdin.close()
    assert backup.wait(timeout=120) == 0, backup.stderr.read().decode()
    return backup.pid, nices


def at(nice: int, count: int = 3):
    """Ready once ``count`` threads run at ``nice`` (two seal workers and the uploader)."""
    return lambda nices: sum(1 for n in nices.values() if n == nice) >= count


def test_workers_run_nicer_than_the_reader(cli_kloset, popen_cli, run_cli) -> None:
    pid, nices = nices_mid_stream(popen_cli, at(BASE + 10), {"PGKLOSET_WORKER_NICE": "10"})
    assert nices[pid] == BASE, nices  # the main thread cuts the stream at the caller's priority
    assert sum(1 for n in nices.values() if n == BASE + 10) >= 3, nices
    assert set(nices.values()) == {BASE, BASE + 10}, nices
    assert run_cli("cat", "latest").stdout == seeded_bytes(7, 40 * MiB)  # stored whole


@pytest.mark.parametrize("setting", [None, "0"])
def test_by_default_or_at_zero_every_thread_keeps_its_priority(cli_kloset, popen_cli,
                                                                setting) -> None:
    env = {"PGKLOSET_WORKER_NICE": setting} if setting else {"PGKLOSET_WORKER_NICE": None}
    _, nices = nices_mid_stream(popen_cli, lambda nices: len(nices) >= 5, env)
    assert len(nices) >= 5, nices  # main, reader, lock refresh, two seal workers, uploader
    assert set(nices.values()) == {BASE}, nices


@pytest.mark.parametrize(("increment", "setting"), [(5, 3), (15, 10)])
def test_worker_nice_adds_to_the_process_nice(cli_kloset, popen_cli, increment,
                                              setting) -> None:
    """Under ``nice -n K`` the workers run K + the setting nicer, at most 19."""
    outer = min(19, BASE + increment)
    workers = min(19, outer + setting)
    pid, nices = nices_mid_stream(popen_cli, at(workers), {"PGKLOSET_WORKER_NICE": str(setting)},
                                  command=["nice", "-n", str(increment), *CLI])
    assert nices[pid] == outer, nices
    assert set(nices.values()) == {outer, workers}, nices


@pytest.mark.parametrize("value", ["ten", "-1", "20", "1.5"])
def test_a_bad_worker_nice_is_one_line_and_stores_nothing(cli_kloset, run_cli, value) -> None:
    before = run_cli("snapshots", "--json").stdout
    proc = run_cli("backup", "stream", "--name", "x.bin", input=seeded_bytes(1, MiB),
                   env_extra={"PGKLOSET_WORKER_NICE": value}, check=False)
    err = proc.stderr.decode().strip()
    assert proc.returncode == 2, err
    assert err.count("\n") == 0 and "PGKLOSET_WORKER_NICE" in err and value in err, err
    assert run_cli("snapshots", "--json").stdout == before


def test_a_bad_worker_nice_stops_a_logical_backup_before_it_connects(cli_kloset, run_cli) -> None:
    # Nothing listens on this port: an error naming the setting, not the connection,
    # shows the value was refused before pg_dump started or the kloset was locked.
    proc = run_cli("backup", "logical", "--dsn", "host=127.0.0.1 port=1 dbname=x",
                   "--database", "x", env_extra={"PGKLOSET_WORKER_NICE": "eleven"}, check=False)
    err = proc.stderr.decode().strip()
    assert proc.returncode == 2, err
    assert err.count("\n") == 0 and "PGKLOSET_WORKER_NICE" in err and "eleven" in err, err
