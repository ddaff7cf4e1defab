"""Process liveness and thread priority, shared by locks, scratch instances, backups and restores."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager


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


BATCH_ENV = "PGKLOSET_BATCH_SCHEDULING"


def batch_scheduling_wanted() -> bool:
    """Whether a backup's own threads run under SCHED_BATCH (``PGKLOSET_BATCH_SCHEDULING``).

    "1" (the default) or "0"; anything else raises ValueError with a
    one-line message, so a typo is not ignored.
    """
    raw = os.environ.get(BATCH_ENV, "").strip()
    if raw in ("", "1"):
        return True
    if raw == "0":
        return False
    raise ValueError(f"{BATCH_ENV} must be 1 (on, the default) or 0 (off), not {raw!r}")


@contextmanager
def batch_scheduling(wanted: bool = True) -> Iterator[None]:
    """Run the calling thread, and the threads it starts meanwhile, under SCHED_BATCH.

    Linux only, and only from the ordinary policy (an operator's ``chrt``
    choice is kept). SCHED_BATCH keeps the thread's CPU share and nice
    value; what changes is that its wake-ups no longer preempt a running
    task. During a backup that task is usually pg_dump or the database
    backend serving it, the dump's one critical path; pgkloset's threads
    can wait for the next tick. Processes started inside the block inherit
    the policy, so pg_dump must be started before it. Restored on the way
    out; never raises (a sandbox may forbid it; the work runs either way).
    """
    setsched = getattr(os, "sched_setscheduler", None)
    if not wanted or setsched is None or not sys.platform.startswith("linux"):
        yield
        return
    try:
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            yield
            return
        setsched(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError:
        yield
        return
    try:
        yield
    finally:
        try:
            setsched(0, os.SCHED_OTHER, os.sched_param(0))
        except OSError:
            pass
