"""Logical backups: pg_dump per database, pg_dumpall --globals-only per cluster.

Custom format (the default) streams pg_dump's stdout straight into the
kloset: no temporary file, memory stays flat. Dump compression is off
(``-Z0``): the kloset compresses after dedup, and compressed dumps do not
deduplicate. Directory format with ``jobs > 1`` is the parallel option;
pg_dump writes the whole (uncompressed) dump to a temporary directory first
(``TMPDIR``), which needs as much free disk as the dump is large.

Each database is dumped inside an exported MVCC snapshot (see facts.py), so
the row counts stored in the snapshot's metadata are exact for the dump.
A failing or cancelled pg_dump commits nothing.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import psycopg

from pgkloset_core.errors import KlosetError, UsageError
from pgkloset_core.kloset.repository import Kloset, ready
from pgkloset_core.kloset.snapshot import Entry
from pgkloset_core.postgres.binaries import NoSuitableBinaries, PgBinaries, find_binaries
from pgkloset_core.postgres.dumpmap import (
    DUMP_MAP_KEY,
    CleanChunks,
    DumpMap,
    DumpScanner,
    Unsupported,
)
from pgkloset_core.postgres.dumpmerge import PART_TABLES_KEY, PARTS_KEY, MergedDump, Part
from pgkloset_core.postgres.dumpsplit import MAX_STREAMS, Table, plan_parts, table_pattern
from pgkloset_core.postgres.facts import SnapshotSession, server_facts
from pgkloset_core.postgres.pgenv import (
    BackupCancelled,
    ConnTarget,
    Log,
    ToolFailed,
    ToolProcess,
    stdio_buffered,
    tool_env,
)

if TYPE_CHECKING:
    from pgkloset_core.kloset.cutter import PreviousCuts

__all__ = ["BackupCancelled", "LogicalBackupResult", "backup_logical", "DatabaseNotFound"]

FORMATS = ("custom", "directory")
MAX_SPLIT_MAJOR = 18  # the newest pg_dump whose archive layout dumpmap.py knows
GLOBALS_ENTRY = "globals.sql"
Progress = Callable[[int], None]


class DatabaseNotFound(KlosetError):
    """A database named for backup does not exist (or does not accept connections)."""


@dataclass
class LogicalBackupResult:
    """What one snapshot of a run holds; the Dagster layer turns it into metadata."""

    snapshot_id: str
    kind: str  # "logical" or "globals"
    database: str | None
    logical_bytes: int
    stored_bytes: int
    seconds: float
    server_version: str
    table_count: int = 0
    total_rows: int = 0
    row_counts: dict[str, int] = field(default_factory=dict)


def dump_entry_name(database: str) -> str:
    return f"{database}.dump"


def part_entry_name(database: str, k: int) -> str:
    """The entry of part ``k`` (1, 2, ...) of a dump taken in parts."""
    return f"{database}.dump.part{k}"


def pick_client(server_major: int, server_version: str, bin_dir: str | None,
                tool: str = "pg_dump") -> PgBinaries:
    """Client tools of major >= the server's; a configured bin dir must fit itself."""
    try:
        chosen = find_binaries(min_major=server_major, bin_dir=bin_dir, tool=tool)
    except NoSuitableBinaries as exc:
        raise NoSuitableBinaries(f"the server runs PostgreSQL {server_version}: {exc}") from None
    if bin_dir is not None and chosen.source != "configured":
        try:
            mine = PgBinaries.from_dir(bin_dir, tool=tool)
            have = f"{tool} {mine.version}"
        except NoSuitableBinaries:
            have = f"no {tool}"
        raise NoSuitableBinaries(
            f"{bin_dir} has {have}, but the server runs PostgreSQL {server_version} and needs "
            f"{tool} {server_major} or newer ({chosen.version} is in {chosen.bin_dir})")
    return chosen


def _run_tag() -> str:
    return f"run:{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def _list_databases(conn: psycopg.Connection[Any]) -> dict[str, bool]:
    rows = conn.execute("SELECT datname, datallowconn AND NOT datistemplate FROM pg_database")
    return {str(name): bool(ok) for name, ok in rows.fetchall()}


def _choose_databases(all_dbs: dict[str, bool], wanted: Sequence[str] | None,
                      exclude: Iterable[str], server: str) -> list[str]:
    skip = set(exclude)
    if wanted is None:
        return sorted(d for d, ok in all_dbs.items() if ok and d not in skip)
    missing = [d for d in wanted if d not in all_dbs]
    if missing:
        raise DatabaseNotFound(f"database {', '.join(missing)} does not exist on {server}")
    closed = [d for d in wanted if not all_dbs[d] and d not in skip]
    if closed:
        raise DatabaseNotFound(f"database {', '.join(closed)} on {server} is a template or "
                               "does not allow connections")
    return [d for d in dict.fromkeys(wanted) if d not in skip]


def _can_read_authid(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT has_table_privilege('pg_catalog.pg_authid', 'SELECT')").fetchone()
    return bool(row and row[0])


def backup_logical(kloset: Kloset | Future[Kloset], dsn: str, databases: list[str] | None, *,
                   exclude: Iterable[str] = (), fmt: str = "custom", jobs: int = 1,
                   streams: int | None = None, tags: Iterable[str] = (), server: str | None = None,
                   bin_dir: str | None = None, lock_wait: float = 0.0,
                   log: Log | None = None, cancel: threading.Event | None = None,
                   progress: Progress | None = None) -> list[LogicalBackupResult]:
    """Back up the cluster's globals and each database as its own snapshot.

    `databases=None` means every database that allows connections, templates
    excepted. All snapshots of one call share a ``run:...`` tag and meta
    ``run_id``. Raises a KlosetError (BackupCancelled when `cancel` is set).
    `kloset` may still be opening (``Kloset.open_soon``): it is waited for
    only once the server has been checked and the client tools chosen.
    ``streams``: how many pg_dump processes share a custom-format dump
    (dumpsplit.py; None: two for databases of 64 MiB or more).
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown dump format {fmt!r} (choose custom or directory)")
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    if jobs > 1 and fmt != "directory":
        raise UsageError("--jobs needs --format directory (pg_dump dumps in parallel only there)")
    if streams is not None and not 1 <= streams <= MAX_STREAMS:
        raise UsageError(f"--streams must be between 1 and {MAX_STREAMS}")
    if streams is not None and streams > 1 and fmt != "custom":
        raise UsageError("--streams is for the custom format (directory format has --jobs)")
    target = ConnTarget.parse(dsn)
    server_name = server or target.label()
    maintenance = target if target.dbname else target.with_db("postgres")
    with maintenance.connect(application_name="pgkloset") as conn:
        sfacts = server_facts(conn)
        chosen = _choose_databases(_list_databases(conn), databases, exclude, server_name)
        authid = _can_read_authid(conn)
    client = pick_client(sfacts["pg_major"], sfacts["pg_version"], bin_dir)
    kloset = ready(kloset)
    run_tag = _run_tag()
    run_id = run_tag.removeprefix("run:")
    base_meta: dict[str, Any] = {
        "server": server_name, "run_id": run_id, "pg_version": sfacts["pg_version"],
        "pg_version_num": sfacts["pg_version_num"],
        "system_identifier": sfacts["system_identifier"],
        "pg_dump_version": client.version,
    }
    all_tags = [*dict.fromkeys([*tags, run_tag])]
    results: list[LogicalBackupResult] = []
    with kloset.lock(exclusive=False, operation="backup", wait=lock_wait) as lock, \
            ExitStack() as early:
        dumps = {db: _Dump(target.with_db(db), client, fmt, log, cancel, streams)
                 for db in chosen}
        if chosen:
            # The first pg_dump starts now, pg_dumpall next to it: their catalog
            # reads overlap the chunk list work that follows.
            early.enter_context(dumps[chosen[0]])
        globals_tool = _start_globals(early, maintenance, client, authid, log, cancel)
        previous = previous_dumps(kloset, chosen) if fmt == "custom" else {}
        results.append(_backup_globals(kloset, lock, globals_tool, base_meta, all_tags,
                                       authid, progress))
        for db in chosen:
            if cancel is not None and cancel.is_set():
                raise BackupCancelled("backup cancelled before database "
                                      f"{db!r}; its snapshot was not made")
            with dumps[db] as dump:  # each dump's session ends with its snapshot
                results.append(_backup_database(kloset, lock, dump, db, base_meta, all_tags,
                                                fmt, jobs, log, cancel, progress,
                                                previous.get(db)))
    return results


def _start_globals(stack: ExitStack, target: ConnTarget, client: PgBinaries, authid: bool,
                   log: Log | None, cancel: threading.Event | None) -> ToolProcess:
    """pg_dumpall --globals-only, running until the stack closes (killed on error)."""
    argv: list[Any] = [client.path("pg_dumpall"), "--globals-only", "-d", target.conninfo()]
    if not authid:
        argv.append("--no-role-passwords")
        warn = ("warning: pg_authid is not readable by this user: globals are dumped "
                "without role passwords (--no-role-passwords)")
        if log is not None:
            log(warn)
        else:
            import sys

            print(f"pgkloset: {warn}", file=sys.stderr)
    env = stack.enter_context(tool_env(target))
    return stack.enter_context(ToolProcess(argv, env, what="pg_dumpall", stdout=-1, log=log,
                                           cancel=cancel))


def _backup_globals(kloset: Kloset, lock: Any, tool: ToolProcess, base_meta: dict[str, Any],
                    tags: list[str], authid: bool,
                    progress: Progress | None) -> LogicalBackupResult:
    meta = {**base_meta, "format": "sql", "database": None, "entry": GLOBALS_ENTRY,
            "no_role_passwords": not authid}
    with kloset.writer(kind="globals", tags=tags, meta=meta, lock=lock) as writer:
        writer.add_stream(GLOBALS_ENTRY, tool.stdout, progress=progress)
        tool.check()
        snap = writer.commit()
    return LogicalBackupResult(
        snapshot_id=snap.id, kind="globals", database=None,
        logical_bytes=int(snap.summary["logical_bytes"]),
        stored_bytes=int(snap.summary["stored_bytes"]), seconds=float(snap.summary["seconds"]),
        server_version=str(base_meta["pg_version"]))


class _Dump:
    """One database's exported snapshot, its row counts and (custom format) its pg_dump.

    ``backup_logical`` enters the first one early, ahead of the work before
    its chunking; entering again is a no-op and so is a second exit, so one
    ``with`` may start it and another end it. On error pg_dump is killed and
    a running count cancelled: nothing is committed.
    """

    def __init__(self, target: ConnTarget, client: PgBinaries, fmt: str, log: Log | None,
                 cancel: threading.Event | None, streams: int | None = None) -> None:
        self.target = target
        self.client = client
        self.fmt = fmt
        self.log = log
        self.cancel = cancel
        self.streams = streams
        self.stack: ExitStack | None = None
        self.closed = False
        self.session: SnapshotSession
        self.env: dict[str, str]
        self.facts: Future[dict[str, Any]]
        self.tool: ToolProcess | None = None
        # A dump in parts (dumpmerge.py): the tables of each part after the main one.
        self.parts: list[list[Table]] = []
        self.part_tools: list[ToolProcess] = []

    @property
    def common(self) -> list[Any]:
        """pg_dump arguments both formats share: no compression, this snapshot, this database."""
        return ["-Z0", f"--snapshot={self.session.snapshot_id}", "-d", self.target.conninfo()]

    def __enter__(self) -> _Dump:
        if self.stack is not None:
            return self
        with ExitStack() as stack:
            self.session = stack.enter_context(SnapshotSession(self.target))
            self.env = stack.enter_context(tool_env(self.target))
            if self.fmt == "custom" and self.client.major <= MAX_SPLIT_MAJOR:
                self.parts = plan_parts(self.session.table_sizes(), self.streams)
            pool = stack.enter_context(
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgkloset-facts"))
            # Counting runs next to the dump, in the same snapshot: the dump does not wait.
            self.facts = pool.submit(self.session.facts)
            stack.callback(self._stop_counting)  # on the way out, before the pool waits
            if self.fmt == "custom":
                moved = [f"--exclude-table-data={table_pattern(t)}"
                         for part in self.parts for t in part]
                self.tool = stack.enter_context(self._pg_dump(moved))
                for part in self.parts:
                    only = [arg for t in part for arg in ("-t", table_pattern(t))]
                    self.part_tools.append(stack.enter_context(
                        self._pg_dump(["--data-only", *only])))
            self.stack = stack.pop_all()
        return self

    def _pg_dump(self, selection: list[str]) -> ToolProcess:
        argv = stdio_buffered([self.client.path("pg_dump"), "-Fc", *selection, *self.common],
                              stdout=True)
        return ToolProcess(argv, self.env, what="pg_dump", stdout=-1, log=self.log,
                           cancel=self.cancel)

    def _stop_counting(self) -> None:
        if not self.facts.done():  # the dump failed or was cancelled mid-count
            self.session.cancel()

    def __exit__(self, *exc: Any) -> None:
        if self.stack is not None and not self.closed:
            self.closed = True
            self.stack.__exit__(*exc)


def _backup_database(kloset: Kloset, lock: Any, dump: _Dump, db: str,
                     base_meta: dict[str, Any], tags: list[str], fmt: str,
                     jobs: int, log: Log | None, cancel: threading.Event | None,
                     progress: Progress | None,
                     previous: PreviousDump | None) -> LogicalBackupResult:
    meta: dict[str, Any] = {**base_meta, "database": db, "format": fmt,
                            "entry": dump_entry_name(db) if fmt == "custom" else "dump/"}
    with kloset.writer(kind="logical", tags=tags, meta=meta, lock=lock) as writer:
        if dump.tool is not None and dump.part_tools:
            _store_parts(writer, dump, db, progress, previous)
        elif dump.tool is not None:
            scanner = DumpScanner()
            entry = _store_dump(writer, dump.tool, dump_entry_name(db), scanner, progress,
                                previous)
            _record_map(entry, scanner, log)
        else:
            _dump_directory(writer, dump.client, dump.common, dump.env, jobs, log, cancel,
                            progress)
        found = dump.facts.result()
        writer.meta.update(found)
        snap = writer.commit()
    return LogicalBackupResult(
        snapshot_id=snap.id, kind="logical", database=db,
        logical_bytes=int(snap.summary["logical_bytes"]),
        stored_bytes=int(snap.summary["stored_bytes"]), seconds=float(snap.summary["seconds"]),
        server_version=str(base_meta["pg_version"]),
        table_count=len(found["tables"]) + len(found["partitioned_tables"]),
        total_rows=int(found["total_rows"]), row_counts=dict(found["tables"]))


@dataclass
class PreviousDump:
    """What a database's latest dump in the kloset tells tonight's backup of it."""

    cuts: PreviousCuts  # its chunk list: the cutter follows it where nothing changed
    clean: CleanChunks | frozenset[bytes]  # chunks inside table data: the scanner skips them


def previous_dumps(kloset: Kloset, databases: Iterable[str]) -> dict[str, PreviousDump]:
    """Per database, its latest custom-format dump in the kloset (only a shortcut).

    One listing of the kloset's snapshots serves every database of the run.
    """
    from pgkloset_core.kloset.cutter import PreviousCuts
    from pgkloset_core.kloset.reader import iter_refs_of

    wanted = set(databases)
    out: dict[str, PreviousDump] = {}
    try:
        for snap in reversed(kloset.snapshots()):
            db = snap.meta.get("database")
            if snap.kind != "logical" or db not in wanted or db in out:
                continue
            main = snap.entry(str(snap.meta.get("entry") or ""))
            if main is None or main.type != "stream":
                continue  # a directory-format dump
            parts = [main, *(e for e in map(snap.entry, snap.meta.get(PARTS_KEY) or [])
                             if e is not None)]
            if len(parts) == 1:
                cuts = PreviousCuts(iter_refs_of(kloset, snap, main))
                found = DumpMap.from_json(main.meta.get(DUMP_MAP_KEY), main.size)
                clean = CleanChunks.from_dump(found, cuts.refs()) if found else frozenset()
                out[db] = PreviousDump(cuts, clean)
            else:
                out[db] = _previous_parts(kloset, snap, parts)
            if len(out) == len(wanted):
                break
    except KlosetError:
        pass  # without it the backup cuts and scans every byte
    return out


def _previous_parts(kloset: Kloset, snap: Any, parts: list[Entry]) -> PreviousDump:
    """A dump in parts: the cutter follows the chunks of all of them (tables may move)."""
    from pgkloset_core.kloset.cutter import PreviousCuts
    from pgkloset_core.kloset.reader import iter_refs_of

    refs = [list(iter_refs_of(kloset, snap, entry)) for entry in parts]
    cleans = []
    for entry, listed in zip(parts, refs, strict=True):
        found = DumpMap.from_json(entry.meta.get(DUMP_MAP_KEY), entry.size)
        if found is not None:
            cleans.append(CleanChunks.from_dump(found, listed))
    return PreviousDump(PreviousCuts(chain.from_iterable(refs)),
                        CleanChunks.union(cleans) if cleans else frozenset())


def _store_dump(writer: Any, tool: ToolProcess, name: str, scanner: DumpScanner,
                progress: Progress | None, previous: PreviousDump | None) -> Entry:
    """One pg_dump's archive as an entry, mapped as it streams by."""
    clean = previous.clean if previous else frozenset()

    def observe(data: bytes, blob_id: bytes) -> None:
        scanner.feed(data, blob_id in clean)

    entry: Entry = writer.add_stream(name, tool.stdout, progress=progress, observe=observe,
                                     previous=previous.cuts if previous else None)
    tool.check()
    return entry


def _store_parts(writer: Any, dump: _Dump, db: str, progress: Progress | None,
                 previous: PreviousDump | None) -> None:
    """The parts of a dump side by side, each its own entry; checked to merge into one archive."""
    assert dump.tool is not None
    tools = [dump.tool, *dump.part_tools]
    names = [dump_entry_name(db), *(part_entry_name(db, k) for k in range(1, len(tools)))]
    scanners = [DumpScanner(keep_head=True) for _ in tools]
    failures: list[BaseException] = []  # the first one is reported, not the kills it caused
    lock = threading.Lock()

    def failed(exc: BaseException) -> None:
        with lock:
            failures.append(exc)
        for tool in tools:
            tool.kill()  # the other parts' streams end, their threads return

    def part_done(fut: Future[Entry]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            failed(cast(BaseException, fut.exception()))

    with ThreadPoolExecutor(max_workers=len(tools) - 1,
                            thread_name_prefix="pgkloset-part") as pool:
        futures = [pool.submit(_store_dump, writer, tool, name, scanner, progress, previous)
                   for tool, name, scanner in zip(tools[1:], names[1:], scanners[1:],
                                                  strict=True)]
        for fut in futures:
            fut.add_done_callback(part_done)
        try:
            entries = [_store_dump(writer, tools[0], names[0], scanners[0], progress, previous)]
            entries += [f.result() for f in futures]
        except BaseException as exc:
            failed(exc)
            wait(futures)
            raise failures[0] from None
    parts: list[Part] = []
    for k, (entry, scanner) in enumerate(zip(entries, scanners, strict=True)):
        found = scanner.finish()
        if found is None or scanner.head is None:
            raise ToolFailed(f"part {k} of the dump of {db!r} could not be mapped "
                             f"({scanner.failed}); nothing was committed. "
                             "--streams 1 dumps it in one part")
        entry.meta[DUMP_MAP_KEY] = found.to_json()
        parts.append(Part(found, scanner.head))
    try:
        merged = MergedDump(parts)
    except Unsupported as exc:
        raise ToolFailed(f"the parts of the dump of {db!r} do not make one archive ({exc}); "
                         "nothing was committed. --streams 1 dumps it in one part") from None
    wanted = sorted(t for part in dump.parts for t in part)
    if merged.tables != wanted:
        raise ToolFailed(f"the parts of the dump of {db!r} hold other tables than planned; "
                         "nothing was committed. --streams 1 dumps it in one part")
    for entry, tables in zip(entries[1:], dump.parts, strict=True):
        entry.meta[PART_TABLES_KEY] = [list(t) for t in tables]
    writer.meta[PARTS_KEY] = names[1:]


def _record_map(entry: Entry, scanner: DumpScanner, log: Log | None) -> None:
    """Keep where the dump's data blocks lie, so partial restores fetch only what they need."""
    found = scanner.finish()
    if found is not None:
        entry.meta[DUMP_MAP_KEY] = found.to_json()
    elif log is not None:
        log(f"note: the dump's data blocks were not mapped ({scanner.failed}); "
            "partial restores of this snapshot read the whole dump")


def _dump_directory(writer: Any, client: PgBinaries, common: list[Any], env: dict[str, str],
                    jobs: int, log: Log | None, cancel: threading.Event | None,
                    progress: Progress | None) -> None:
    """pg_dump -Fd -j N into a temporary directory, then each file as an entry."""
    tmp = Path(tempfile.mkdtemp(prefix="pgkloset-dump-"))
    try:
        out = tmp / "dump"
        argv = [client.path("pg_dump"), "-Fd", "-j", str(jobs), "-f", str(out), *common]
        with ToolProcess(argv, env, what="pg_dump", log=log, cancel=cancel) as tool:
            tool.check()
        writer.add_special("dump", "dir", mode=0o700)
        names = sorted(os.listdir(out), key=lambda n: (n != "toc.dat", n))
        for name in names:
            path = out / name
            with open(path, "rb") as f:
                writer.add_stream(f"dump/{name}", f, entry_type="file", progress=progress,
                                  mode=0o600)
            path.unlink()  # free the disk as we go
    except OSError as exc:
        raise ToolFailed(f"cannot read pg_dump's output in {tmp}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
