"""Restoring logical snapshots: a database, a schema, a table, or cluster globals.

Order of work: resolve the snapshot, check the target (pre-flight: the
extensions, roles and tablespaces the snapshot needs; objects already there),
and only then touch it. pg_restore runs with ``--exit-on-error``; without
``jobs`` the whole restore is one transaction (``--single-transaction``), so
a failure leaves the target as it was, and a database created for the
restore is dropped again. A half restore is never reported as success.

Streaming: a custom-format entry is fed straight into pg_restore's stdin.
``pg_restore -j`` needs a seekable file, so with ``jobs > 1`` the entry is
first spooled to a temporary file (``TMPDIR``; as large as the dump).
Directory-format snapshots are always written to a temporary directory.

Partial restores are built from the archive's table of contents
(``pg_restore -l``) as a ``-L`` list, so a table comes with its indexes,
constraints, triggers, rules, policies, defaults, owned sequences, comments
and grants -- unlike ``pg_restore -t``, which brings the table alone. When
the backup mapped the dump's data blocks (dumpmap.py), a partial restore
fetches only the table of contents and the blocks it restores.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from pgkloset_core.errors import KlosetError, SnapshotNotFound, UsageError
from pgkloset_core.kloset.repository import Kloset
from pgkloset_core.kloset.snapshot import Entry, Snapshot
from pgkloset_core.postgres.binaries import PgBinaries
from pgkloset_core.postgres.dumpmap import DUMP_MAP_KEY, DumpMap, Unsupported
from pgkloset_core.postgres.dumpmerge import PARTS_KEY, MergedDump, Part
from pgkloset_core.postgres.logical import pick_client
from pgkloset_core.postgres.pgenv import (
    ConnTarget,
    Log,
    ToolFailed,
    ToolProcess,
    run_tool,
    stdio_buffered,
    tool_env,
)

Progress = Callable[[int], None]


class PreflightFailed(KlosetError):
    """The target lacks what the snapshot needs, or already has what it would create."""


class RestoreFailed(KlosetError):
    """pg_restore or psql reported an error; the restore is not complete."""


@dataclass
class RestoreResult:
    snapshot_id: str
    database: str | None
    seconds: float
    created_database: bool = False
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ snapshot


def resolve_snapshot(kloset: Kloset, ref: str, database: str | None = None) -> Snapshot:
    """`latest` (of `database` when given), an id or a unique prefix."""
    if ref.strip().lower() == "latest" and database:
        snaps = [s for s in kloset.snapshots()
                 if s.kind == "logical" and s.meta.get("database") == database]
        if not snaps:
            raise SnapshotNotFound(f"no logical snapshot of database {database!r}")
        return snaps[-1]
    snap = kloset.resolve(ref)
    if database and snap.kind == "logical" and snap.meta.get("database") != database:
        raise UsageError(f"snapshot {snap.short_id} is of database "
                         f"{snap.meta.get('database')!r}, not {database!r}")
    return snap


def _dump_entry(snap: Snapshot) -> Entry:
    name = str(snap.meta.get("entry") or "")
    entry = snap.entry(name) if name else None
    if entry is None:
        streams = [e for e in snap.entries if e.type == "stream"]
        if len(streams) != 1:
            raise KlosetError(f"snapshot {snap.short_id} holds no single dump entry")
        entry = streams[0]
    return entry


def dump_entries(snap: Snapshot) -> list[Entry]:
    """The entries holding the dump: the main one, then any parts (dumpmerge.py)."""
    entries = [_dump_entry(snap)]
    for name in snap.meta.get(PARTS_KEY) or []:
        entry = snap.entry(str(name))
        if entry is None:
            raise KlosetError(f"snapshot {snap.short_id} lacks part {name!r} of its dump")
        entries.append(entry)
    return entries


def merged_dump(kloset: Kloset, snap: Snapshot) -> MergedDump | None:
    """The one archive a dump taken in parts makes (None for a dump in one part)."""
    entries = dump_entries(snap)
    if len(entries) == 1:
        return None
    parts: list[Part] = []
    for entry in entries:
        found = DumpMap.from_json(entry.meta.get(DUMP_MAP_KEY), entry.size)
        if found is None:
            raise KlosetError(f"snapshot {snap.short_id}: entry {entry.name} has no dump map")
        head = b"".join(kloset.read_entry(snap, entry, ranges=[(0, found.toc_end)]))
        parts.append(Part(found, head))
    try:
        return MergedDump(parts)
    except Unsupported as exc:
        raise KlosetError(f"snapshot {snap.short_id}: the parts of its dump do not fit "
                          f"together ({exc})") from None


def read_merged(kloset: Kloset, snap: Snapshot, merged: MergedDump,
                ranges: list[tuple[int, int]] | None) -> Iterator[bytes | memoryview]:
    """Bytes of the archive a dump in parts makes (all of it, or ``ranges``)."""
    entries = dump_entries(snap)

    def read_part(index: int, wanted: list[tuple[int, int]]) -> Iterator[bytes]:
        return kloset.read_entry(snap, entries[index], ranges=wanted)

    try:
        yield from merged.read(ranges, read_part)
    except Unsupported as exc:
        raise KlosetError(f"snapshot {snap.short_id}: {exc}") from None


# ----------------------------------------------------------- archive access


class _Archive:
    """The dump on disk (spooled or directory) or streamed from the kloset.

    A custom-format dump whose data blocks were mapped at backup time
    (dumpmap.py) is read selectively: the table of contents alone for
    ``pg_restore -l``, and for a partial restore only the blocks it needs
    (``select``). A spooled dump (``spool``, for ``pg_restore -j``) is written
    on first use, after ``select``, so it too holds only what is needed.
    """

    def __init__(self, kloset: Kloset, snap: Snapshot, *, spool: bool,
                 progress: Progress | None) -> None:
        self.kloset = kloset
        self.snap = snap
        self.progress = progress
        self.path: Path | None = None
        self._tmp: Path | None = None
        self._spool_wanted = False
        self.map: DumpMap | None = None
        self.merged: MergedDump | None = None  # a dump taken in parts
        self.ranges: list[tuple[int, int]] | None = None  # None: the whole entry
        try:
            if snap.meta.get("format") == "directory":
                self._materialize_dir()
            else:
                entry = _dump_entry(snap)
                self.merged = merged_dump(kloset, snap)
                self.map = (self.merged.map if self.merged is not None
                            else DumpMap.from_json(entry.meta.get(DUMP_MAP_KEY), entry.size))
                self._spool_wanted = spool
        except BaseException as exc:
            self.close()  # no half-written dump left in TMPDIR (the `with` never started)
            if isinstance(exc, OSError):
                raise RestoreFailed(f"cannot write the dump to a temporary directory: "
                                    f"{exc.strerror or exc}") from None
            raise

    def select(self, dump_ids: set[int]) -> None:
        """Read only the blocks of these TOC entries (when the dump is mapped)."""
        if self.map is None or self.path is not None:
            return
        wanted = dump_ids & self.map.block_ids()
        self.ranges = None if wanted == self.map.block_ids() else self.map.ranges(wanted)

    def _tmpdir(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="pgkloset-restore-"))
        return self._tmp

    def _spool(self) -> None:
        path = self._tmpdir() / "dump.custom"
        try:
            with open(path, "wb") as f:
                for data in self._read(self.ranges):
                    f.write(data)
                    if self.progress:
                        self.progress(len(data))
        except OSError as exc:
            raise RestoreFailed(f"cannot write the dump to a temporary directory: "
                                f"{exc.strerror or exc}") from None
        self.path = path

    def _read(self, ranges: list[tuple[int, int]] | None) -> Iterator[bytes | memoryview]:
        if self.merged is not None:
            return read_merged(self.kloset, self.snap, self.merged, ranges)
        return self.kloset.read_entry(self.snap, _dump_entry(self.snap), ranges=ranges)

    def _materialize_dir(self) -> None:
        out = self._tmpdir() / "dump"
        out.mkdir(mode=0o700)
        for entry in self.snap.entries:
            if not entry.name.startswith("dump/") or entry.type != "file":
                continue
            name = entry.name.removeprefix("dump/")
            if "/" in name or name in ("", ".", ".."):
                raise KlosetError(f"snapshot {self.snap.short_id}: bad entry name {entry.name!r}")
            with open(out / name, "wb") as f:
                for data in self.kloset.read_entry(self.snap, entry):
                    f.write(data)
                    if self.progress:
                        self.progress(len(data))
        self.path = out

    def run(self, argv: list[Any], env: dict[str, str], *, what: str, log: Log | None,
            cancel: threading.Event | None, stdout: int = subprocess.DEVNULL,
            toc_only: bool = False) -> bytes:
        """Run a pg_restore-like tool on the archive (path argument or stdin).

        ``toc_only``: the tool reads just the table of contents (``-l``).
        """
        if self._spool_wanted and self.path is None and not toc_only:
            self._spool()
        if self.path is not None:
            with ToolProcess([*argv, str(self.path)], env, what=what, stdout=stdout, log=log,
                             cancel=cancel) as tool:
                out = tool.stdout.read() if stdout == subprocess.PIPE else b""
                tool.check()
            return out
        ranges = [(0, self.map.toc_end)] if toc_only and self.map is not None else self.ranges
        # pg_restore reads stdin through stdio, 4 KiB a call on a pipe: give it 1 MiB.
        with ToolProcess(stdio_buffered(argv, stdin=True), env, what=what,
                         stdin=subprocess.PIPE, stdout=stdout, log=log, cancel=cancel) as tool:
            failure: list[BaseException] = []
            feeder = threading.Thread(target=self._feed, args=(tool, ranges, failure),
                                      daemon=True, name="pgkloset-restore-feed")
            feeder.start()
            out = tool.stdout.read() if stdout == subprocess.PIPE else b""
            feeder.join()
            if failure:
                tool.kill()
                tool.wait()
                raise failure[0]
            tool.check()
        return out

    def _feed(self, tool: ToolProcess, ranges: list[tuple[int, int]] | None,
              failure: list[BaseException]) -> None:
        try:
            for data in self._read(ranges):
                tool.stdin.write(data)
                if self.progress:
                    self.progress(len(data))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the tool stopped reading (pg_restore -l needs only the TOC)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            failure.append(exc)
        finally:
            with contextlib.suppress(OSError):
                tool.stdin.close()

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> _Archive:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


# ------------------------------------------------------------------- TOC


# Longest first: descriptions may contain spaces.
_DESCS = sorted([
    "MATERIALIZED VIEW DATA", "MATERIALIZED VIEW", "SEQUENCE OWNED BY", "SEQUENCE SET",
    "FK CONSTRAINT", "TABLE DATA", "TABLE ATTACH", "INDEX ATTACH", "ROW SECURITY",
    "DEFAULT ACL", "FOREIGN TABLE", "SECURITY LABEL", "EVENT TRIGGER", "OPERATOR CLASS",
    "OPERATOR FAMILY", "TEXT SEARCH CONFIGURATION", "TEXT SEARCH DICTIONARY",
    "TEXT SEARCH PARSER", "TEXT SEARCH TEMPLATE", "FOREIGN DATA WRAPPER", "FOREIGN SERVER",
    "USER MAPPING", "SHELL TYPE", "PUBLICATION TABLE", "PUBLICATION TABLES IN SCHEMA",
    "LARGE OBJECT", "BLOB METADATA", "PROCEDURAL LANGUAGE", "STATISTICS DATA",
], key=len, reverse=True)
_TOC_LINE = re.compile(r"^\d+; \d+ \d+ (.*)$")


@dataclass(frozen=True)
class TocItem:
    line: str
    desc: str
    schema: str
    rest: str  # tag, then owner

    def tag_is(self, name: str) -> bool:
        return self.rest == name or self.rest.startswith(name + " ")


def parse_toc(text: str) -> list[TocItem]:
    items = []
    for line in text.splitlines():
        m = _TOC_LINE.match(line)
        if not m:
            continue
        body = m.group(1)
        desc = next((d for d in _DESCS if body.startswith(d + " ")), body.split(" ", 1)[0])
        after = body[len(desc) + 1:]
        schema, _, rest = after.partition(" ")
        items.append(TocItem(line=line, desc=desc, schema=schema, rest=rest))
    return items


def partitions_first(items: list[TocItem], lines: list[str]) -> list[str]:
    """Move partitions' constraints before all other constraints in a -L list.

    ``pg_restore --clean`` drops in reverse list order; dropping a partition's
    primary key before its parent's fails ("cannot drop inherited constraint").
    Created in this order they still attach to the parent's index: pg_dump
    creates the parent's with ONLY and attaches the partitions' afterwards.
    """
    partitions = {(i.schema, i.rest.split(" ", 1)[0]) for i in items if i.desc == "TABLE ATTACH"}
    by_line = {i.line: i for i in items}

    def is_partition_constraint(line: str) -> bool:
        item = by_line.get(line)
        return (item is not None and item.desc == "CONSTRAINT"
                and (item.schema, item.rest.split(" ", 1)[0]) in partitions)

    moved = [ln for ln in lines if is_partition_constraint(ln)]
    if not moved:
        return lines
    rest = [ln for ln in lines if not is_partition_constraint(ln)]
    first = next((n for n, ln in enumerate(rest)
                  if by_line.get(ln) is not None and by_line[ln].desc == "CONSTRAINT"), len(rest))
    return rest[:first] + moved + rest[first:]


def _split_table(name: str) -> tuple[str, str]:
    schema, dot, table = name.partition(".")
    return (schema, table) if dot else ("public", name)


_TABLE_TAGGED = {"CONSTRAINT", "FK CONSTRAINT", "TRIGGER", "POLICY", "RULE", "DEFAULT"}
_ANNOTATIONS = {"COMMENT", "ACL", "SECURITY LABEL"}


def select_toc(items: list[TocItem], *, schemas: Iterable[str], tables: Iterable[str],
               meta: dict[str, Any], target_schemas: set[str], target_tables: set[str],
               target_functions: Collection[str] = ()) -> tuple[list[str], list[str]]:
    """The -L lines for the chosen schemas and tables, and warnings about what was left out."""
    schemas = list(schemas)
    chosen_tables = [_split_table(t) for t in tables]
    chosen_names = {f"{s}.{t}" for s, t in chosen_tables}
    keep: list[str] = []
    warnings: list[str] = []
    objects: dict[str, dict[str, list[str]]] = meta.get("table_objects", {})
    needed_schemas = set(schemas) | {s for s, _ in chosen_tables}
    # Trigger functions of chosen tables come along unless the target has them already.
    functions = {f for s, t in chosen_tables
                 for f in objects.get(f"{s}.{t}", {}).get("trigger_functions", [])
                 if f not in target_functions}
    needed_schemas |= {f.split(" ", 1)[0] for f in functions}
    for item in items:
        if item.desc == "FUNCTION" and any(
                f.split(" ", 1)[0] == item.schema and item.tag_is(f.split(" ", 1)[1])
                for f in functions):
            keep.append(item.line)
            continue
        if item.desc == "SCHEMA" and item.schema == "-":
            name = item.rest.rsplit(" ", 1)[0] if " " in item.rest else item.rest
            if name in needed_schemas and name not in target_schemas:
                keep.append(item.line)
            continue
        if item.schema == "-" and item.desc in _ANNOTATIONS and any(
                item.tag_is(f"SCHEMA {s}") for s in schemas):
            keep.append(item.line)
            continue
        chosen = item.schema in schemas or any(
            item.schema == schema and _belongs(item, table, objects.get(f"{schema}.{table}", {}))
            for schema, table in chosen_tables)
        if chosen and (item.desc != "FK CONSTRAINT" or _fk_ok(
                item, objects, schemas, chosen_names, target_tables, warnings)):
            keep.append(item.line)
    return keep, warnings


def _belongs(item: TocItem, table: str, deps: dict[str, list[str]]) -> bool:
    if item.desc in ("TABLE", "TABLE DATA", "ROW SECURITY"):
        return item.tag_is(table)
    if item.desc in _TABLE_TAGGED:
        return item.rest.startswith(table + " ")
    if item.desc == "INDEX":
        return any(item.tag_is(i) for i in deps.get("indexes", []))
    if item.desc in ("SEQUENCE", "SEQUENCE OWNED BY", "SEQUENCE SET"):
        return any(item.tag_is(s) for s in deps.get("sequences", []))
    if item.desc in _ANNOTATIONS:
        subjects = [f"TABLE {table}", f"COLUMN {table}.",
                    *(f"INDEX {i}" for i in deps.get("indexes", [])),
                    *(f"SEQUENCE {s}" for s in deps.get("sequences", []))]
        return (any(item.rest.startswith(s) for s in subjects)
                or f" ON {table} " in item.rest + " ")
    return False


def _fk_ok(item: TocItem, objects: dict[str, dict[str, list[str]]], schemas: list[str],
           chosen: set[str], target_tables: set[str], warnings: list[str]) -> bool:
    """A foreign key is kept when the table it references will exist after the restore."""
    table, _, rest = item.rest.partition(" ")
    for fk in objects.get(f"{item.schema}.{table}", {}).get("foreign_keys", []):
        name, _, ref = fk.rpartition(" ")
        if rest == name or rest.startswith(name + " "):
            if ref in chosen or ref in target_tables or _split_table(ref)[0] in schemas:
                return True
            warnings.append(f"foreign key {name} of {item.schema}.{table} skipped: "
                            f"it references {ref}, which is not restored and not in the target")
            return False
    return True


# -------------------------------------------------------------- pre-flight


@dataclass
class _TargetState:
    db_exists: bool
    major: int
    version: str
    roles: set[str]
    tablespaces: set[str]
    available_extensions: set[str]
    schemas: set[str] = field(default_factory=set)
    tables: set[str] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)  # "schema name()" of argument-less ones


def _inspect_target(target: ConnTarget, dbname: str) -> _TargetState:
    maintenance = target.with_db("postgres")
    try:
        conn = maintenance.connect(application_name="pgkloset")
    except KlosetError:
        conn = target.with_db("template1").connect(application_name="pgkloset")
    with conn:
        num = int(conn.execute("SHOW server_version_num").fetchone()[0])  # type: ignore[index]
        version = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                              (dbname,)).fetchone() is not None
        state = _TargetState(
            db_exists=exists, major=num // 10000, version=version,
            roles={str(r[0]) for r in conn.execute("SELECT rolname FROM pg_roles")},
            tablespaces={str(r[0]) for r in conn.execute("SELECT spcname FROM pg_tablespace")},
            available_extensions={str(r[0]) for r in conn.execute(
                "SELECT name FROM pg_available_extensions")})
    if exists:
        with target.with_db(dbname).connect(application_name="pgkloset") as db:
            state.schemas = {str(r[0]) for r in db.execute("SELECT nspname FROM pg_namespace")}
            state.tables = {f"{s}.{t}" for s, t in db.execute(
                "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
                "ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')")}
            state.functions = {f"{s} {f}()" for s, f in db.execute(
                "SELECT n.nspname, p.proname FROM pg_proc p JOIN pg_namespace n "
                "ON n.oid = p.pronamespace WHERE p.pronargs = 0")}
    return state


def _missing(meta: dict[str, Any], state: _TargetState) -> dict[str, list[str]]:
    return {
        "extensions": sorted(set(meta.get("extensions", {})) - state.available_extensions),
        "roles": sorted(set(meta.get("roles_needed", [])) - state.roles),
        "tablespaces": sorted(set(meta.get("tablespaces_needed", [])) - state.tablespaces),
    }


def _short(names: list[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ------------------------------------------------------------------ restore


def restore_logical(kloset: Kloset, snapshot: Snapshot, to_dsn: str, *,
                    create: bool = False, clean: bool = False, schemas: Iterable[str] = (),
                    tables: Iterable[str] = (), schema_only: bool = False,
                    data_only: bool = False, no_owner: bool = False, jobs: int = 1,
                    force_preflight: bool = False, bin_dir: str | None = None,
                    log: Log | None = None, cancel: threading.Event | None = None,
                    progress: Progress | None = None) -> RestoreResult:
    """Restore a logical snapshot into the database named by `to_dsn`.

    The target database is the DSN's dbname, or the snapshot's database when
    the DSN names none. Raises PreflightFailed before touching the target,
    RestoreFailed when pg_restore fails (after undoing what it can).
    """
    started = time.monotonic()
    if snapshot.kind != "logical":
        raise UsageError(f"snapshot {snapshot.short_id} is a {snapshot.kind} snapshot, "
                         "not a logical one")
    if schema_only and data_only:
        raise UsageError("--schema-only and --data-only exclude each other")
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    schemas, tables = list(schemas), list(tables)
    meta = snapshot.meta
    target = ConnTarget.parse(to_dsn)
    dbname = target.dbname or str(meta.get("database") or "")
    if not dbname:
        raise UsageError("name the target database in the --to connection string")
    state = _inspect_target(target, dbname)
    warnings: list[str] = []
    if create and state.db_exists and not clean:
        raise PreflightFailed(f"database {dbname!r} already exists on the target; restore "
                              "into it without --create, add --clean to replace it, or pick "
                              "another name")
    if not create and not state.db_exists:
        raise PreflightFailed(f"database {dbname!r} does not exist on the target; "
                              "add --create to create it")

    missing = _missing(meta, state)
    blocking = {k: v for k, v in missing.items()
                if v and not (k == "roles" and no_owner) and not force_preflight}
    if blocking:
        parts = [f"{k} {_short(v)}" for k, v in blocking.items()]
        hint = "install or create them"
        if "roles" in blocking:
            hint += ", restore the globals snapshot first, or add --no-owner"
        raise PreflightFailed(
            f"pre-flight: PostgreSQL {state.version} at {target.label()} lacks what snapshot "
            f"{snapshot.short_id} needs: {'; '.join(parts)} ({hint}; --force-preflight "
            "tries anyway)")
    extra_flags: list[str] = []
    if missing["roles"]:
        extra_flags.append("--no-privileges")  # grants to absent roles would fail
        warnings.append(f"roles missing on the target ({_short(missing['roles'])}): "
                        "restoring without owners and grants")
    if missing["tablespaces"]:
        extra_flags.append("--no-tablespaces")
        warnings.append(f"tablespaces missing on the target ({_short(missing['tablespaces'])})"
                        ": objects go to the default tablespace")

    partial = bool(schemas or tables)
    replace_db = create and state.db_exists  # --create --clean on an existing database
    if not partial and state.db_exists and not clean and not data_only and not replace_db:
        present = sorted(set(meta.get("tables", {})) & state.tables)
        if present:
            raise PreflightFailed(
                f"database {dbname!r} on the target already has {len(present)} of the "
                f"snapshot's tables ({_short(present, 3)}); add --clean to replace them, "
                "or restore into an empty database")

    client = pick_client(max(state.major, _major(meta.get("pg_dump_version"))),
                         state.version, bin_dir, tool="pg_restore")
    # --clean drops in reverse list order; pg_restore's own order fails on partitions.
    use_list = partial or (clean and not data_only and state.db_exists and not create)
    with _Archive(kloset, snapshot, spool=jobs > 1, progress=None if use_list else progress) \
            as archive, tool_env(target) as env, contextlib.ExitStack() as stack:
        list_file: Path | None = None
        if use_list:
            list_file = _partial_list(archive, client, env, snapshot, schemas, tables, state,
                                      clean=clean or data_only, schema_only=schema_only,
                                      log=log, cancel=cancel,
                                      warnings=warnings)
            archive.progress = progress
            stack.callback(list_file.unlink, missing_ok=True)
        elif schema_only:
            archive.select(set())  # pg_restore reads no data: fetch the TOC and the schema
        created = _prepare_database(target, dbname, create=create, replace=replace_db,
                                    encoding=str(meta.get("encoding") or "UTF8"))
        argv: list[Any] = [client.path("pg_restore"), "--exit-on-error", *extra_flags]
        if jobs > 1:
            argv += ["-j", str(jobs)]
        else:
            argv.append("--single-transaction")
        if clean and not create and not data_only:
            argv += ["--clean", "--if-exists"]
        if no_owner:
            argv.append("--no-owner")
        if schema_only:
            argv.append("--schema-only")
        if data_only:
            argv.append("--data-only")
        if list_file is not None:
            argv += ["-L", str(list_file)]
        argv += ["-d", target.with_db(dbname).conninfo()]
        try:
            archive.run(argv, env, what="pg_restore", log=log, cancel=cancel)
        except KlosetError as exc:
            if created:
                _drop_database(target, dbname)
                undo = f"database {dbname!r} was dropped again"
            elif jobs > 1:
                undo = "the target may hold a partial restore (parallel restores are not atomic)"
            else:
                undo = "nothing was changed (the restore ran in one transaction)"
            raise RestoreFailed(f"restore of snapshot {snapshot.short_id} into {dbname!r} "
                                f"failed; {undo}: {exc}") from None
    return RestoreResult(snapshot_id=snapshot.id, database=dbname,
                         seconds=round(time.monotonic() - started, 3),
                         created_database=created, warnings=warnings)


def _major(version: Any) -> int:
    m = re.match(r"(\d+)", str(version or ""))
    return int(m.group(1)) if m else 0


def _partial_list(archive: _Archive, client: PgBinaries, env: dict[str, str], snap: Snapshot,
                  schemas: list[str], tables: list[str], state: _TargetState, *, clean: bool,
                  schema_only: bool, log: Log | None, cancel: threading.Event | None,
                  warnings: list[str]) -> Path:
    out = archive.run([client.path("pg_restore"), "-l"], env, what="pg_restore -l", log=log,
                      cancel=cancel, stdout=subprocess.PIPE, toc_only=True)
    items = parse_toc(out.decode("utf-8", "replace"))
    known_tables = {f"{i.schema}.{i.rest.split(' ', 1)[0]}" for i in items
                    if i.desc in ("TABLE", "VIEW", "MATERIALIZED VIEW", "FOREIGN TABLE")}
    known_schemas = {i.schema for i in items if i.schema != "-"} | set(snap.meta.get("schemas", []))
    for t in tables:
        s, n = _split_table(t)
        if f"{s}.{n}" not in known_tables:
            raise PreflightFailed(f"snapshot {snap.short_id} has no table {s}.{n}")
    for s in schemas:
        if s not in known_schemas:
            raise PreflightFailed(f"snapshot {snap.short_id} has no schema {s}")
    if not clean:
        chosen = {"{}.{}".format(*_split_table(t)) for t in tables}
        chosen |= {t for t in known_tables if t.split(".", 1)[0] in schemas}
        present = sorted(chosen & state.tables)
        if present:
            raise PreflightFailed(f"the target already has {_short(present, 3)}; add --clean "
                                  "to replace, or restore into an empty database")
    if schemas or tables:
        keep, notes = select_toc(items, schemas=schemas, tables=tables, meta=snap.meta,
                                 target_schemas=state.schemas, target_tables=state.tables,
                                 target_functions=state.functions)
        warnings.extend(notes)
    else:
        keep = [i.line for i in items]
    if clean:
        keep = partitions_first(items, keep)
    # Only the data blocks of the chosen entries are fetched (none for a schema-only restore).
    archive.select(set() if schema_only else {int(ln.split(";", 1)[0]) for ln in keep})
    fd, path = tempfile.mkstemp(prefix="pgkloset-toc-", suffix=".list")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(keep) + "\n")
    return Path(path)


def _prepare_database(target: ConnTarget, dbname: str, *, create: bool, replace: bool,
                      encoding: str) -> bool:
    if not create:
        return False
    with _admin(target) as conn:
        name = sql.Identifier(dbname)
        try:
            if replace:
                conn.execute(sql.SQL("DROP DATABASE {}").format(name))
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING {}").format(
                name, sql.Literal(encoding)))
        except psycopg.Error as exc:
            raise RestoreFailed(f"cannot create database {dbname!r}: "
                                f"{str(exc).strip().splitlines()[0]}") from None
    return True


def _drop_database(target: ConnTarget, dbname: str) -> None:
    with contextlib.suppress(KlosetError, psycopg.Error), _admin(target) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(dbname)))


@contextlib.contextmanager
def _admin(target: ConnTarget) -> Iterator[psycopg.Connection[Any]]:
    try:
        conn = target.with_db("postgres").connect(application_name="pgkloset")
    except KlosetError:
        conn = target.with_db("template1").connect(application_name="pgkloset")
    with conn:
        yield conn


# ------------------------------------------------------------------ globals


_ROLE_LINE = re.compile(r'^(CREATE|ALTER) ROLE ("(?:[^"]|"")*"|[^\s;]+)( WITH .*)?;$')
_TABLESPACE_LINE = re.compile(r'^CREATE TABLESPACE ("(?:[^"]|"")*"|[^\s;]+) ')
# psql learned \restrict in these minor releases; older ones reject the line.
_RESTRICT_SINCE = {13: 22, 14: 19, 15: 14, 16: 10, 17: 6}


def _ident(text: str) -> str:
    return text[1:-1].replace('""', '"') if text.startswith('"') else text


def prepare_globals_sql(text: str, roles: set[str], tablespaces: set[str],
                        psql_restrict: bool) -> tuple[str, list[str]]:
    """Leave existing roles and tablespaces alone (no CREATE, no attribute change)."""
    out: list[str] = []
    kept: list[str] = []
    for line in text.splitlines():
        m = _ROLE_LINE.match(line)
        if m and _ident(m.group(2)) in roles and (m.group(1) == "CREATE" or m.group(3)):
            if m.group(1) == "CREATE":
                kept.append(_ident(m.group(2)))
            out.append(f"-- pgkloset: role exists on the target, left as it is: {line[:60]}")
            continue
        t = _TABLESPACE_LINE.match(line)
        if t and _ident(t.group(1)) in tablespaces:
            out.append(f"-- pgkloset: tablespace exists on the target: {_ident(t.group(1))}")
            continue
        if line.startswith(("\\restrict", "\\unrestrict")) and not psql_restrict:
            continue
        if line.startswith("\\") and not line.startswith(("\\restrict", "\\unrestrict",
                                                           "\\connect")):
            raise KlosetError(f"globals snapshot holds an unexpected psql command: {line[:40]}")
        out.append(line)
    return "\n".join(out) + "\n", kept


def _psql_knows_restrict(version: str) -> bool:
    parts = [int(p) for p in re.findall(r"\d+", version)[:2]] + [0, 0]
    major, minor = parts[0], parts[1]
    if major in _RESTRICT_SINCE:
        return minor >= _RESTRICT_SINCE[major]
    return major > 17


def restore_globals(kloset: Kloset, snapshot: Snapshot, to_dsn: str, *,
                    bin_dir: str | None = None, log: Log | None = None,
                    cancel: threading.Event | None = None) -> RestoreResult:
    """Replay a globals snapshot with psql; existing roles and tablespaces are kept as they are."""
    started = time.monotonic()
    if snapshot.kind != "globals":
        raise UsageError(f"snapshot {snapshot.short_id} is not a globals snapshot")
    target = ConnTarget.parse(to_dsn)
    dbname = target.dbname or "postgres"
    state = _inspect_target(target, dbname)
    entry = _dump_entry(snapshot)
    # Globals are small (roles, tablespaces): read whole to rewrite existing-role lines.
    text = b"".join(kloset.read_entry(snapshot, entry)).decode("utf-8")
    client = pick_client(state.major, state.version, bin_dir, tool="psql")
    script, kept = prepare_globals_sql(text, state.roles, state.tablespaces,
                                       _psql_knows_restrict(client.version))
    argv = [client.path("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d",
            target.with_db(dbname).conninfo(), "-f", "-"]
    with tempfile.NamedTemporaryFile("w", prefix="pgkloset-globals-", suffix=".sql",
                                     encoding="utf-8") as f:
        f.write(script)
        f.flush()
        with tool_env(target) as env:
            try:
                run_tool(argv, env, what="psql", log=log, cancel=cancel, input_path=Path(f.name))
            except ToolFailed as exc:
                raise RestoreFailed(f"restore of globals snapshot {snapshot.short_id} stopped at "
                                    f"the first error (statements before it were applied): "
                                    f"{exc}") from None
    warnings = [f"roles already on the target were left as they are: {_short(kept)}"] if kept \
        else []
    return RestoreResult(snapshot_id=snapshot.id, database=None,
                         seconds=round(time.monotonic() - started, 3), warnings=warnings)
