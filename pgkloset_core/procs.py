"""Process liveness and thread priority, shared by locks, scratch instances, backups and restores."""

from __future__ import annotations

import os
import sys
import threading


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs and is not a zombie (containers may never reap orphans)."""
    if not 0 < pid < 2**31:  # os.kill(0 or -1) would signal a whole group
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc: ask the kernel directly
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state not in (b"Z", b"X")


WORKER_NICE_ENV = "PGKLOSET_WORKER_NICE"
DEFAULT_WORKER_NICE = 0  # measured: no faster backups, later days slower (BENCHMARKS.md)


def worker_nice() -> int:
    """How much nicer than the process a backup's worker threads run (0: as nice).

    Read from ``PGKLOSET_WORKER_NICE`` (0-19, default 0). Raises ValueError
    with a one-line message for anything else, so a typo is not ignored.
    """
    raw = os.environ.get(WORKER_NICE_ENV, "").strip()
    if not raw:
        return DEFAULT_WORKER_NICE
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= 19:
        raise ValueError(f"{WORKER_NICE_ENV} must be a whole number from 0 to 19, not {raw!r}")
    return value


def lower_thread_priority(increment: int) -> None:
    """Make the calling thread ``increment`` nicer than it is (Linux only).

    On Linux a thread has its own nice value (setpriority with its thread id);
    elsewhere that id could name another process, so nothing is done. A
    backup's worker threads can fall behind and catch up; pg_dump, the
    database backend serving it and the server's other queries cannot, so an
    operator may want the workers to be the ones that wait. Never raises (a
    sandbox may forbid it; the work runs either way).
    """
    if increment <= 0 or not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    except OSError:
        pass
