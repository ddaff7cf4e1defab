"""Cold storage: thaw exactly the packs a read needs, then read.

Data packs may sit in an archive class (S3 GLACIER or DEEP_ARCHIVE) that
cannot be read until a temporary copy is restored, which takes minutes to
hours and costs money per byte. So a restore first works out which packs
its entries touch (chunk refs, through the index), asks the backend to thaw
just those, waits (polling each pack's state) and only then reads.

Chunk lists of long entries live in list blobs, which are themselves in
packs. The writer keeps those packs in a hot class, but an older kloset or
a lifecycle rule may have frozen them: then planning takes two rounds, first
the packs holding the list blobs, then the data packs they name.

Everything here is a no-op on backends without cold storage.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pgkloset_core.errors import KlosetError
from pgkloset_core.kloset.pack import pack_name
from pgkloset_core.kloset.reader import iter_refs_of
from pgkloset_core.kloset.snapshot import Entry, Snapshot, iter_refs
from pgkloset_core.storage.base import FROZEN, READABLE, Backend, ObjectNotFound
from pgkloset_core.storage.retry import TransientStorageError, backoff

if TYPE_CHECKING:
    from pgkloset_core.kloset.repository import Kloset

DEFAULT_POLL_SECONDS = 60.0
POLL_ENV = "PGKLOSET_THAW_POLL_SECONDS"
THREADS = 16
ATTEMPTS = 5


class ThawPending(KlosetError):
    """Packs are being thawed and the caller chose not to wait (``--no-wait``)."""

    exit_code = 75  # EX_TEMPFAIL: try again later


@dataclass
class ThawPlan:
    """The packs a read needs that are not readable yet."""

    packs: list[str]  # object names, frozen or thawing
    bytes: int  # their stored size
    frozen: list[str] = field(default_factory=list)  # no thaw requested yet
    needed: int = 0  # packs the read touches, readable ones included
    complete: bool = True  # False: chunk lists are frozen, data packs are not known yet
    snapshot: Snapshot | None = field(default=None, repr=False)
    entries: list[Entry] = field(default_factory=list, repr=False)

    @property
    def ready(self) -> bool:
        return self.complete and not self.packs


@dataclass(frozen=True)
class ThawProgress:
    thawed: int
    total: int
    bytes: int
    round: int
    waited: float

    def describe(self) -> str:
        return (f"{self.thawed}/{self.total} pack(s) thawed ({_size(self.bytes)} in all), "
                f"waited {self.waited / 60:.0f} min")


@dataclass
class ThawResult:
    requested: list[str] = field(default_factory=list)  # packs a thaw was asked for
    bytes: int = 0
    rounds: int = 0
    waited: float = 0.0


Progress = Callable[[ThawProgress], None]


def content_entries(snapshot: Snapshot, entries: Iterable[Entry] | None = None) -> list[Entry]:
    chosen = snapshot.entries if entries is None else list(entries)
    return [e for e in chosen if e.inline or e.lists]


def plan_thaw(kloset: Kloset, snapshot: Snapshot, entries: Sequence[Entry] | None = None) -> ThawPlan:
    """Which packs reading ``entries`` (default: all) needs thawed; never reads a frozen pack."""
    chosen = content_entries(snapshot, entries)
    index = kloset.load_index()
    list_packs: set[str] = set()
    for entry in chosen:
        for list_id in entry.lists:
            loc = index.lookup(bytes.fromhex(list_id))
            if loc is not None:  # a missing one is reported by the read itself
                list_packs.add(loc.pack_id)
    states = cold_states(kloset.backend, list_packs)
    lists_readable = all(state in READABLE for state, _size in states.values())
    data_packs: set[str] = set()
    for entry in chosen:
        refs = iter_refs_of(kloset, snapshot, entry) if lists_readable else iter_refs(entry.inline)
        for blob_id, _length in refs:
            loc = index.lookup(blob_id)
            if loc is not None:
                data_packs.add(loc.pack_id)
    states.update(cold_states(kloset.backend, data_packs - set(states)))
    waiting = sorted(p for p, (state, _size) in states.items() if state not in READABLE)
    return ThawPlan(
        packs=[pack_name(p) for p in waiting],
        bytes=sum(states[p][1] for p in waiting),
        frozen=[pack_name(p) for p in waiting if states[p][0] == FROZEN],
        needed=len(states),
        complete=lists_readable,
        snapshot=snapshot,
        entries=chosen,
    )


def thaw(kloset: Kloset, plan: ThawPlan, *, wait: bool = True, poll_interval: float | None = None,
         progress: Progress | None = None) -> ThawResult:
    """Request a thaw of the plan's frozen packs; wait until all are readable, or raise ThawPending."""
    backend = kloset.backend
    interval = poll_interval if poll_interval is not None else _poll_seconds()
    result = ThawResult()
    started = time.monotonic()
    while True:
        result.rounds += 1
        _request(backend, plan.frozen)
        result.requested.extend(plan.frozen)
        result.bytes += plan.bytes
        if plan.ready:
            break
        if not wait:
            raise ThawPending(_pending_message(plan))
        _wait(backend, plan, interval, progress, result.rounds, started)
        if plan.complete:
            break
        if plan.snapshot is None:
            raise KlosetError("an incomplete thaw plan needs its snapshot to plan again")
        plan = plan_thaw(kloset, plan.snapshot, plan.entries)
    result.waited = time.monotonic() - started
    return result


def prepare_read(kloset: Kloset, snapshot: Snapshot, entries: Sequence[Entry] | None = None, *,
                 wait: bool = True, poll_interval: float | None = None,
                 progress: Progress | None = None) -> ThawResult | None:
    """Make ``entries`` (default: all) of ``snapshot`` readable; None when nothing was cold."""
    if not kloset.backend.may_be_cold:
        return None
    plan = plan_thaw(kloset, snapshot, entries)
    if plan.ready:
        return None
    return thaw(kloset, plan, wait=wait, poll_interval=poll_interval, progress=progress)


def cold_states(backend: Backend, pack_ids: Iterable[str]) -> dict[str, tuple[str, int]]:
    """pack id -> (state, size), asked in parallel; packs that are gone are left out."""
    ids = sorted(pack_ids)
    if not ids:
        return {}

    def one(pack_id: str) -> tuple[str, tuple[str, int] | None]:
        try:
            return pack_id, _retrying(lambda: backend.cold_state(pack_name(pack_id)))
        except ObjectNotFound:
            return pack_id, None

    with ThreadPoolExecutor(min(THREADS, len(ids)), thread_name_prefix="pgkloset-thaw") as pool:
        return {p: st for p, st in pool.map(one, ids) if st is not None}


def stderr_progress(say: Callable[[str], None] | None = None) -> Progress:
    """For the CLI: one line on stderr when waiting starts, then ``say`` (a spinner) each poll."""
    announced = False

    def report(p: ThawProgress) -> None:
        nonlocal announced
        if not announced:
            announced = True
            sys.stderr.write(f"pgkloset: waiting for {p.total - p.thawed} pack(s) to thaw from cold "
                             f"storage; interrupting is safe, the same command resumes\n")
            sys.stderr.flush()
        if say is not None:
            say(p.describe())

    return report


# -- helpers ---------------------------------------------------------------------


def _request(backend: Backend, names: Sequence[str]) -> None:
    if not names:
        return
    with ThreadPoolExecutor(min(THREADS, len(names)), thread_name_prefix="pgkloset-thaw") as pool:
        list(pool.map(lambda n: _retrying(lambda: backend.request_thaw(n)), names))


def _wait(backend: Backend, plan: ThawPlan, interval: float, progress: Progress | None,
          round_no: int, started: float) -> None:
    remaining = {name.rsplit("/", 1)[-1] for name in plan.packs}
    total = len(remaining)
    while True:
        states = cold_states(backend, remaining)
        again = [pack_name(p) for p, (state, _size) in states.items() if state == FROZEN]
        _request(backend, again)  # a thaw that expired or was never recorded
        remaining = {p for p, (state, _size) in states.items() if state not in READABLE}
        if progress is not None:
            progress(ThawProgress(total - len(remaining), total, plan.bytes, round_no,
                                  time.monotonic() - started))
        if not remaining:
            return
        time.sleep(interval)


def _retrying(fn: Callable[[], object]) -> object:
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return fn()
        except TransientStorageError:
            if attempt == ATTEMPTS:
                raise
            time.sleep(backoff(attempt, 0.5, 10.0))
    raise AssertionError("unreachable")


def _pending_message(plan: ThawPlan) -> str:
    what = "chunk lists" if not plan.complete else "data"
    short = plan.snapshot.short_id if plan.snapshot is not None else "?"
    later = "; a second round for the data follows" if not plan.complete else ""
    return (f"snapshot {short}: {len(plan.packs)} pack(s) of {what} ({_size(plan.bytes)}) are "
            f"being thawed from cold storage{later}; run the same command again later "
            f"(hours for GLACIER, up to 12 h for DEEP_ARCHIVE) and it continues from there")


def _poll_seconds() -> float:
    try:
        return max(0.01, float(os.environ.get(POLL_ENV, DEFAULT_POLL_SECONDS)))
    except ValueError:
        return DEFAULT_POLL_SECONDS


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
