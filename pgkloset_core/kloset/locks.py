"""Shared and exclusive locks, refreshed while work runs.

Backups and restores take shared locks; forget and prune take exclusive
ones. A lock is a sealed object ``locks/<random id>`` rewritten every
``refresh_interval``. A lock not refreshed for ``stale_after`` (or whose
process is gone, on the same host) is stale. A writer that cannot refresh
its lock must not commit: by then another process may consider it dead.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from pgkloset_core.errors import CorruptObject, LockError
from pgkloset_core.kloset.crypto import MasterKey
from pgkloset_core.kloset.keys import _username
from pgkloset_core.kloset.sealed import KIND_LOCK, seal_json, unseal_json
from pgkloset_core.procs import pid_alive
from pgkloset_core.storage.base import Backend, ObjectNotFound, StorageError

LOCKS_PREFIX = "locks/"


@dataclass(frozen=True)
class LockTiming:
    refresh_interval: float = 300.0
    stale_after: float = 1800.0
    poll_interval: float = 1.0

    @classmethod
    def from_env(cls) -> LockTiming:
        """Operators (and tests) may shorten the timings through the environment."""
        refresh = float(os.environ.get("PGKLOSET_LOCK_REFRESH_SECONDS", cls.refresh_interval))
        stale = float(os.environ.get("PGKLOSET_LOCK_STALE_SECONDS", cls.stale_after))
        return cls(refresh_interval=refresh, stale_after=max(stale, refresh * 2))


@dataclass(frozen=True)
class LockInfo:
    name: str
    exclusive: bool
    hostname: str
    pid: int
    username: str
    operation: str
    created: float
    refreshed: float

    def is_stale(self, timing: LockTiming, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if now - self.refreshed > timing.stale_after:
            return True
        return self.hostname == socket.gethostname() and not pid_alive(self.pid)

    def describe(self) -> str:
        kind = "exclusive" if self.exclusive else "shared"
        try:
            since = datetime.fromtimestamp(self.created, UTC).isoformat(timespec="seconds")
        except (OverflowError, OSError, ValueError):  # a time no calendar holds
            since = f"an unreadable time ({self.created!r})"
        return f"{kind} lock by {self.operation} (pid {self.pid} on {self.hostname}, since {since})"


def read_locks(backend: Backend, master: MasterKey) -> list[LockInfo]:
    infos = []
    for obj in backend.list(LOCKS_PREFIX):
        try:
            doc = unseal_json(master, KIND_LOCK, backend.read(obj.name), obj.name)
            infos.append(
                LockInfo(obj.name, bool(doc["exclusive"]), str(doc["hostname"]), int(doc["pid"]),
                         str(doc["username"]), str(doc["operation"]), float(doc["created"]),
                         float(doc["refreshed"]))
            )
        except ObjectNotFound:
            continue  # released meanwhile
        except (CorruptObject, KeyError, TypeError, ValueError, OverflowError):
            continue  # damaged: not a lock we can honour
        # Any other StorageError propagates: a lock we failed to read may well be held,
        # and taking ours anyway (say, prune's exclusive one) would break the holder.
    return infos


class Lock:
    """A held lock; refreshes itself in a background thread."""

    def __init__(self, backend: Backend, master: MasterKey, exclusive: bool, operation: str,
                 timing: LockTiming, created: float | None = None) -> None:
        self.backend = backend
        self.master = master
        self.exclusive = exclusive
        self.operation = operation
        self.timing = timing
        self.name = LOCKS_PREFIX + secrets.token_hex(32)
        self.created = time.time() if created is None else created
        self.last_refresh = 0.0
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_lost: Callable[[str], None] | None = None

    def _doc(self, now: float) -> dict[str, object]:
        return {
            "exclusive": self.exclusive,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "username": _username(),
            "operation": self.operation,
            "created": self.created,
            "refreshed": now,
        }

    def write(self) -> None:
        now = time.time()
        self.backend.write(self.name, seal_json(self.master, KIND_LOCK, self._doc(now)), overwrite=True)
        self.last_refresh = now

    def start_refreshing(self) -> None:
        self._thread = threading.Thread(target=self._refresh_loop, name="pgkloset-lock", daemon=True)
        self._thread.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.timing.refresh_interval):
            try:
                # Rewriting a lock someone removed (`unlock --force`, or a peer that judged it
                # stale) would hide that loss from ensure_valid: check first.
                if not self.backend.exists(self.name):
                    self._mark_lost(f"lock {self.name} was removed by another process")
                    return
                self.write()
            except Exception as exc:  # noqa: BLE001 - any failure means the lock is not held
                self._mark_lost(f"cannot refresh lock {self.name}: {exc}")
                return

    def _mark_lost(self, reason: str) -> None:
        self.lost = reason
        if self.on_lost:
            self.on_lost(reason)

    def ensure_valid(self) -> None:
        """Raise unless the lock is certainly still ours (called before any commit)."""
        if self.lost:
            raise LockError(f"lock lost, not committing: {self.lost}")
        age = time.time() - self.last_refresh
        if age > self.timing.stale_after - self.timing.refresh_interval:
            raise LockError(f"lock not refreshed for {age:.0f}s, not committing")
        if not self.backend.exists(self.name):
            raise LockError(f"lock {self.name} was removed by another process, not committing")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.backend.delete(self.name)
        except StorageError:
            pass  # a stale lock is harmless: it expires or `unlock` removes it

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(backend: Backend, master: MasterKey, *, exclusive: bool, operation: str,
            wait: float = 0.0, timing: LockTiming | None = None) -> Lock:
    """Take a lock, waiting up to ``wait`` seconds for conflicting ones to go.

    Every attempt writes its lock, then looks for conflicts, so of two racing
    processes at least one sees the other. A shared waiter removes its lock
    between attempts. An exclusive waiter that is the oldest exclusive one
    keeps its lock in place while it waits: new shared lockers then back off
    and the running ones drain, so a stream of overlapping backups cannot
    starve prune forever. It still proceeds only when no conflict is left.
    """
    timing = timing or LockTiming.from_env()
    deadline = time.monotonic() + wait
    queued_since = time.time()
    lock = Lock(backend, master, exclusive, operation, timing, created=queued_since)
    try:
        lock.write()
        while True:
            conflicts = _conflicts(backend, master, lock, timing)
            if not conflicts:
                lock.start_refreshing()
                return lock
            out_of_time = time.monotonic() >= deadline
            keep_place = exclusive and not out_of_time and not any(
                c.exclusive and (c.created, c.name) < (lock.created, lock.name) for c in conflicts)
            if not keep_place:
                lock.release()
            if out_of_time:
                hint = " (use --lock-wait to wait, or `pgkloset unlock` if it is stale)"
                raise LockError(f"kloset is locked: {conflicts[0].describe()}{hint}")
            time.sleep(min(timing.poll_interval, max(0.05, deadline - time.monotonic())))
            if not keep_place:
                lock = Lock(backend, master, exclusive, operation, timing, created=queued_since)
                lock.write()
            elif time.time() - lock.last_refresh > timing.refresh_interval / 2:
                lock.write()
    except BaseException:
        lock.release()  # never leave a waiting lock behind (deleting a missing one is fine)
        raise


def _conflicts(backend: Backend, master: MasterKey, mine: Lock, timing: LockTiming) -> list[LockInfo]:
    found = []
    for info in read_locks(backend, master):
        if info.name == mine.name or info.is_stale(timing):
            continue
        if info.exclusive or mine.exclusive:
            found.append(info)
    # Report the holder that matters most: an exclusive lock, else the oldest.
    return sorted(found, key=lambda i: (not i.exclusive, i.created, i.name))


def remove_stale(backend: Backend, master: MasterKey, *, force: bool = False,
                 timing: LockTiming | None = None) -> list[LockInfo]:
    """Delete stale locks (every lock with ``force``); returns what was removed."""
    timing = timing or LockTiming.from_env()
    removed = []
    for info in read_locks(backend, master):
        if force or info.is_stale(timing):
            backend.delete(info.name)
            removed.append(info)
    return removed
