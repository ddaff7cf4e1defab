"""Restore drills: prove that a snapshot restores, and that what comes back is what went in.

A drill restores a snapshot into a throwaway scratch instance (see
`instance.py`), then compares the restored database with the facts recorded
at backup time: the restore tool exited cleanly, every table holds exactly
the rows counted in the dumped snapshot, object counts match, physical
restores pass `pg_verifybackup` and `pg_amcheck --all`, and the user's SQL
checks return true. It measures the restore time (the RTO a real incident
would see) and reports everything as a `DrillReport` for the CLI and Dagster.

Everything the drill creates lives in one private work directory that is
deleted afterwards, also when a check fails, the restore raises, or the
process receives SIGINT or SIGTERM (turned into `DrillInterrupted`, so
cleanup runs before the process exits). A SIGKILL allows no cleanup: the
directory records its owner, and the next drill's `sweep_stale()` removes it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from pgkloset_core.errors import KlosetError, SnapshotNotFound
from pgkloset_core.kloset.repository import Kloset
from pgkloset_core.kloset.snapshot import Snapshot
from pgkloset_core.postgres.binaries import NoSuitableBinaries, PgBinaries, find_binaries
from pgkloset_core.postgres.facts import database_facts
from pgkloset_core.postgres.instance import (
    DRILL_DIR_PREFIX,
    Instance,
    InstanceOptions,
    InstanceProvider,
    LocalInstance,
    LocalInstanceProvider,
    OsUser,
    _traversable_by,
    mark_owner,
    sweep_stale,
)

Log = Callable[[str], None]
DRILL_PREFIX = DRILL_DIR_PREFIX
DRILLABLE_KINDS = ("logical", "physical")


class DrillError(KlosetError):
    """The drill could not be run at all (wrong kind of snapshot, no binaries, ...)."""


class DrillFailed(KlosetError):
    """The drill ran and at least one check failed."""

    exit_code = 4


class DrillInterrupted(BaseException):
    """SIGINT or SIGTERM arrived; raised after the scratch instance was removed.

    A BaseException, like KeyboardInterrupt, so that no `except Exception`
    on the way (a check, a restore step) mistakes it for a finding.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"drill interrupted by {self.signal_name}; scratch instance and "
                         "files removed")


# ------------------------------------------------------------------ results


@dataclass(frozen=True)
class SqlCheck:
    """A user query that must return exactly one row with one true value."""

    name: str
    sql: str
    database: str | None = None  # None: the drilled database

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SqlCheck:
        """The file's text is the query; `-- database: NAME` on a line picks the database."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise DrillError(f"cannot read SQL check {p}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise DrillError(f"SQL check {p} is not UTF-8 text") from None
        if not text.strip():
            raise DrillError(f"SQL check {p} is empty")
        database = None
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.lower().startswith("-- database:"):
                database = stripped.split(":", 1)[1].strip() or None
        return cls(name=p.name, sql=text, database=database)


@dataclass
class CheckResult:
    """One verification: what was expected, what the restored database showed."""

    name: str
    passed: bool
    expected: Any = None
    actual: Any = None
    message: str = ""
    skipped: bool = False

    def describe(self) -> str:
        """One line; `message` (when set) already starts with the check's name."""
        return self.message or f"{self.name}: expected {self.expected!r}, got {self.actual!r}"


@dataclass
class DrillReport:
    """The outcome of one drill; `passed` only when every check passed and nothing broke."""

    snapshot_id: str
    kind: str
    database: str | None
    passed: bool = False
    checks: list[CheckResult] = field(default_factory=list)
    restore_seconds: float = 0.0
    bytes_read: int = 0
    source_version: str | None = None
    scratch_version: str | None = None
    isolated: bool = False
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    def first_failure(self) -> str | None:
        """One line naming what is wrong, for the CLI's error line and Dagster."""
        for check in self.checks:
            if not check.passed:
                return check.describe()
        return self.errors[0] if self.errors else None

    def add(self, check: CheckResult) -> CheckResult:
        self.checks.append(check)
        return check

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["restore_seconds"] = round(self.restore_seconds, 3)
        doc["seconds"] = round(self.seconds, 3)
        doc["first_failure"] = self.first_failure()
        return doc


# ------------------------------------------------------------ the drill


def run_drill(kloset: Kloset, snapshot: Snapshot | str, *, database: str | None = None,
              sql_checks: Sequence[SqlCheck | str | os.PathLike[str]] = (),
              provider: InstanceProvider | None = None, isolate: bool = True,
              log: Log | None = None, work_dir: str | os.PathLike[str] | None = None,
              bin_dir: str | os.PathLike[str] | None = None,
              lock_wait: float = 0.0) -> DrillReport:
    """Restore `snapshot` into a scratch instance, verify it, and throw the instance away.

    Check failures are reported, not raised: look at `report.passed`. Raises
    DrillError when the drill cannot run (e.g. no binaries for the snapshot's
    version) and DrillInterrupted on SIGINT/SIGTERM, after cleaning up.
    """
    say = log or (lambda _msg: None)
    checks = [c if isinstance(c, SqlCheck) else SqlCheck.from_file(c) for c in sql_checks]
    snap = kloset.resolve(snapshot) if isinstance(snapshot, str) else snapshot
    if snap.kind not in DRILLABLE_KINDS:
        raise DrillError(f"snapshot {snap.short_id} is of kind {snap.kind!r}; drills restore "
                         f"{' or '.join(DRILLABLE_KINDS)} snapshots")
    kloset.prepare_read(snap)  # cold storage: thaw the packs the restore reads, first
    report = DrillReport(snapshot_id=snap.id, kind=snap.kind, database=database,
                         source_version=source_version(snap))
    binaries = scratch_binaries(snap, bin_dir=bin_dir)
    report.scratch_version = binaries.version
    prov = provider or LocalInstanceProvider(bin_dir=bin_dir)
    started = time.monotonic()
    user = prov.user if isinstance(prov, LocalInstanceProvider) else None
    # Leftovers of drills (and scratch servers) whose process was SIGKILLed.
    for stale in sweep_stale(Path(work_dir or tempfile.gettempdir()).absolute()):
        say(f"removed {stale}, left by a process that died")
    with _SignalGuard() as guard:
        base: Path | None = None
        scratch: _Scratch | None = None
        try:
            base = _make_work_dir(work_dir, user)
            say(f"drill of {snap.kind} snapshot {snap.short_id} in {base}")
            scratch = _Scratch(prov, binaries, base, isolate)
            if snap.kind == "logical":
                _drill_logical(kloset, snap, report, scratch, database, checks, say, lock_wait)
            else:
                _drill_physical(kloset, snap, report, scratch, database, checks, say, lock_wait)
        except DrillError:
            raise
        except KlosetError as exc:  # e.g. the scratch server would not start, a lock was held
            report.errors.append(f"{type(exc).__name__}: {_one_line(exc)}")
        finally:
            with guard.deferred():  # a second Ctrl-C must not cut the cleanup short
                if scratch is not None:
                    scratch.close()
                if base is not None:
                    shutil.rmtree(base, ignore_errors=True)
    report.seconds = time.monotonic() - started
    report.passed = bool(report.checks) and not report.failures and not report.errors
    return report


def resolve_drillable(kloset: Kloset, ref: str, database: str | None = None) -> Snapshot:
    """`latest` means the newest logical (of `database`, if given) or physical snapshot."""
    if ref.strip().lower() != "latest":
        return kloset.resolve(ref)
    candidates = [s for s in kloset.snapshots() if s.kind in DRILLABLE_KINDS and (
        database is None or s.kind == "physical" or s.meta.get("database") == database)]
    if not candidates:
        what = f" of database {database!r}" if database else ""
        raise SnapshotNotFound(f"no logical or physical snapshot{what} to drill")
    return candidates[-1]  # oldest first, as kloset.resolve('latest') orders them


def scratch_binaries(snapshot: Snapshot, *, bin_dir: str | os.PathLike[str] | None = None
                     ) -> PgBinaries:
    """Server binaries for the drill: the snapshot's major; newer ones only for logical dumps."""
    major = source_major(snapshot)
    if snapshot.kind == "physical" and major is None:
        raise DrillError(f"physical snapshot {snapshot.short_id} records no PostgreSQL version; "
                         "cannot pick binaries to start it")
    try:
        if bin_dir is not None:  # asked for explicitly: use it, or say why not
            chosen = PgBinaries.from_dir(bin_dir, tool="postgres")
            if major is not None and (chosen.major != major if snapshot.kind == "physical"
                                      else chosen.major < major):
                need = (f"exactly major version {major} (a data directory only starts under "
                        "its own major)" if snapshot.kind == "physical"
                        else f"major version {major} or newer")
                raise NoSuitableBinaries(f"{chosen.bin_dir} has PostgreSQL {chosen.version}; "
                                         f"this snapshot needs {need}")
            return chosen
        if snapshot.kind == "physical":
            return find_binaries(exact_major=major, tool="postgres")
        return find_binaries(min_major=major, tool="postgres")
    except NoSuitableBinaries as exc:
        raise DrillError(f"cannot drill snapshot {snapshot.short_id}: {exc}") from None


def _drill_logical(kloset: Kloset, snap: Snapshot, report: DrillReport, scratch: _Scratch,
                   database: str | None, checks: Sequence[SqlCheck], say: Log,
                   lock_wait: float) -> None:
    dbname = logical_database(snap, database)
    report.database = dbname
    instance = scratch.start()
    report.isolated = instance.isolated
    say(f"scratch PostgreSQL {instance.binaries.version} "
        f"({'network isolated' if instance.isolated else f'port {instance.port}'})")
    counter = _ByteCounter()
    clock = time.monotonic()
    with kloset.lock(exclusive=False, operation="drill", wait=lock_wait):
        globals_snap = globals_of(kloset, snap)
        if globals_snap is not None:
            say(f"restoring roles from globals snapshot {globals_snap.short_id}")
            outcome = restore_globals_snapshot(kloset, globals_snap, instance, counter, say)
            report.add(_restore_check("restore globals", outcome))
        say(f"restoring database {dbname}")
        outcome = restore_logical_snapshot(kloset, snap, dbname, instance, counter, say,
                                           no_owner=globals_snap is None)
    report.restore_seconds = time.monotonic() - clock
    report.bytes_read = counter.total
    report.add(_restore_check(f"restore {dbname}", outcome))
    if outcome.ok:
        say(f"comparing facts of database {dbname}")
        _compare_facts(report, instance, dbname, Facts.from_meta(snap.meta))
    _run_sql_checks(report, instance, checks, dbname, say)


def _restore_check(name: str, outcome: Outcome) -> CheckResult:
    return CheckResult(name=name, passed=outcome.ok, expected="clean exit, no errors",
                       actual=outcome.summary,
                       message="" if outcome.ok else f"{name}: {outcome.summary}")


def _drill_physical(kloset: Kloset, snap: Snapshot, report: DrillReport, scratch: _Scratch,
                    database: str | None, checks: Sequence[SqlCheck], say: Log,
                    lock_wait: float) -> None:
    data_dir = scratch.base / "data"
    counter = _ByteCounter()
    clock = time.monotonic()
    with kloset.lock(exclusive=False, operation="drill", wait=lock_wait):
        say(f"restoring data directory into {data_dir}")
        outcome = restore_physical_snapshot(kloset, snap, data_dir, scratch.binaries,
                                            counter=counter, log=say)
    report.bytes_read = counter.total
    report.add(_restore_check("restore", outcome))
    if not outcome.ok:
        report.restore_seconds = time.monotonic() - clock
        return
    if outcome.verified is not None:
        report.add(CheckResult(name="pg_verifybackup", passed=True, expected="manifest matches",
                               actual=outcome.verified))
    else:
        report.add(verify_backup(data_dir, scratch.binaries))
        if report.failures:
            report.restore_seconds = time.monotonic() - clock
            return
    try:
        superuser = str(snap.meta.get("bootstrap_superuser") or "postgres")
        instance = scratch.start_existing(data_dir, superuser)
    except KlosetError as exc:
        report.restore_seconds = time.monotonic() - clock
        report.add(CheckResult(name="start restored cluster", passed=False,
                               expected="server accepts connections", actual="failed to start",
                               message=f"start restored cluster: {_one_line(exc)}"))
        return
    report.restore_seconds = time.monotonic() - clock
    report.isolated = instance.isolated
    say(f"restored cluster up on PostgreSQL {instance.binaries.version} "
        f"({'network isolated' if instance.isolated else f'port {instance.port}'})")
    databases = cluster_databases(instance)
    if database is not None:
        if database not in databases:
            report.add(CheckResult(name=f"database {database}", passed=False, expected="present",
                                   actual="missing", message=f"database {database} is not in the "
                                   f"restored cluster (it has: {', '.join(databases)})"))
            return
        databases = [database]
    report.database = database
    recorded = physical_facts(snap)
    for db in databases:
        if db in recorded:
            _compare_facts(report, instance, db, recorded[db])
        else:
            report.add(read_every_table(instance, db))
    report.add(amcheck(instance, databases))
    _run_sql_checks(report, instance, checks, database or default_database(snap, databases),
                    say)


def _compare_facts(report: DrillReport, instance: Instance, dbname: str,
                   expected: Facts) -> None:
    """Row counts per table and object counts, measured the way backup measured them."""
    try:
        actual = collect_facts(instance, dbname)
    except Exception as exc:  # a broken restore may break fact queries: that is a finding
        report.add(CheckResult(name=f"facts {dbname}", passed=False, expected="readable catalog",
                               actual=type(exc).__name__,
                               message=f"cannot read facts of {dbname}: {_one_line(exc)}"))
        return
    prefix = "" if report.kind == "logical" else f"{dbname}:"
    for table in sorted(set(expected.tables) | set(actual.tables)):
        want = expected.tables.get(table)
        got = actual.tables.get(table)
        name = f"rows {prefix}{table}"
        if want is None:
            report.add(CheckResult(name, False, None, got,
                                   f"{name}: table {table} is in the restore but was not recorded "
                                   "at backup time"))
        elif got is None:
            report.add(CheckResult(name, False, want, None,
                                   f"{name}: table {table} is missing from the restore "
                                   f"(expected {want} rows)"))
        else:
            report.add(CheckResult(name, want == got, want, got,
                                   "" if want == got else f"{name}: expected {want} rows, "
                                   f"restored {got}"))
    for kind in sorted(set(expected.objects) | set(actual.objects)):
        want_n = expected.objects.get(kind)
        got_n = actual.objects.get(kind)
        if want_n is None:
            continue  # counted now but not at backup time (older pgkloset): nothing to compare
        name = f"objects {prefix}{kind}"
        ok = want_n == got_n
        report.add(CheckResult(name, ok, want_n, got_n,
                               "" if ok else f"{name}: expected {want_n}, restored {got_n}"))
    if expected.extensions is not None and actual.extensions is not None:
        want_ext, got_ext = sorted(expected.extensions), sorted(actual.extensions)
        missing = [e for e in want_ext if e not in got_ext]
        name = f"extensions {prefix}".rstrip(": ")
        report.add(CheckResult(name, not missing, want_ext, got_ext,
                               f"{name}: missing {', '.join(missing)}" if missing else ""))


def _run_sql_checks(report: DrillReport, instance: Instance, checks: Sequence[SqlCheck],
                    default_db: str, say: Log | None = None) -> None:
    for check in checks:
        if say is not None:
            say(f"running SQL check {check.name} in database {check.database or default_db}")
        report.add(run_sql_check(instance, check.name, check.sql, check.database or default_db))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --------------------------------------------------------- scratch lifecycle


class _ByteCounter:
    """Counts bytes read from the kloset (the drill's bytes_read)."""

    def __init__(self) -> None:
        self.total = 0

    def __call__(self, n: int) -> None:
        self.total += n


class _Scratch:
    """The instance of one drill; `close()` stops it, whatever state it is in."""

    def __init__(self, provider: InstanceProvider, binaries: PgBinaries, base: Path,
                 isolate: bool) -> None:
        self.provider = provider
        self.binaries = binaries
        self.base = base
        self.isolate = isolate
        self.instance: Instance | None = None

    def _options(self) -> InstanceOptions:
        return InstanceOptions(isolate_network=self.isolate, base_dir=str(self.base),
                               tcp=None if self.isolate else True)

    def start(self) -> Instance:
        self.instance = self.provider.start(self.binaries, self._options())
        return self.instance

    def start_existing(self, data_dir: Path, superuser: str) -> Instance:
        if not isinstance(self.provider, LocalInstanceProvider):
            raise DrillError("physical drills need a local provider (the data directory "
                             "is restored on this machine)")
        settings = {"archive_mode": "off", "fsync": "off", "synchronous_commit": "off",
                    "full_page_writes": "off"}
        opts = InstanceOptions(isolate_network=self.isolate, base_dir=str(self.base),
                               tcp=None if self.isolate else True, settings=settings,
                               superuser=superuser)
        self.instance = self.provider.start_existing_data_dir(data_dir, self.binaries, opts)
        return self.instance

    def close(self) -> None:
        if self.instance is not None:
            self.instance.stop()
            if isinstance(self.instance, LocalInstance):
                _wait_gone(self.instance)


def _wait_gone(instance: LocalInstance, seconds: float = 15.0) -> None:
    """stop() signals and waits for the postmaster; wait for its children too."""
    deadline = time.monotonic() + seconds
    data = str(instance.data_dir)
    while time.monotonic() < deadline and postgres_pids_under(data):
        time.sleep(0.05)


def _make_work_dir(parent: str | os.PathLike[str] | None, user: OsUser | None) -> Path:
    """A private directory for everything the drill writes (removed by run_drill)."""
    where = Path(parent or tempfile.gettempdir()).absolute()
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DrillError(f"cannot create work directory {where}: {exc.strerror}") from None
    if user is not None and not _traversable_by(where, user):
        raise DrillError(f"OS user {user.name} (who runs the scratch server) cannot enter "
                         f"{where}; choose a work directory it can reach")
    try:
        path = Path(tempfile.mkdtemp(prefix=DRILL_PREFIX, dir=where))
    except OSError as exc:
        raise DrillError(f"cannot create a directory in {where}: {exc.strerror}") from None
    os.chmod(path, 0o711)  # the server's OS user must traverse it, not list it
    mark_owner(path)  # after a SIGKILL, the next drill's sweep_stale() removes it
    return path


class _SignalGuard:
    """SIGINT/SIGTERM become DrillInterrupted (main thread only) so cleanup runs first.

    While cleanup runs (`deferred()`), a signal is remembered and raised when
    cleanup is done, so a second Ctrl-C cannot leave a half-deleted instance.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}
        self.pending: int | None = None
        self.deferring = 0
        self.active = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> _SignalGuard:
        if self.active:
            from pgkloset_core.postgres import instance as _instance

            _instance._install_handlers()  # keep the provider's own handlers under ours
            for signum in self.SIGNALS:
                previous = signal.getsignal(signum)
                if previous == signal.SIG_IGN:
                    continue
                self.previous[signum] = previous
                signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.deferring:
            self.pending = self.pending or signum
            return
        raise DrillInterrupted(signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.deferring += 1
        try:
            yield
        finally:
            self.deferring -= 1
        if not self.deferring and self.pending is not None:
            signum, self.pending = self.pending, None
            raise DrillInterrupted(signum)

    def __exit__(self, *_exc: object) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
        self.previous.clear()


# ------------------------------------------------------------------ facts


@dataclass
class Facts:
    """What a database holds: exact row counts per table, object counts, extensions."""

    tables: dict[str, int] = field(default_factory=dict)
    objects: dict[str, int] = field(default_factory=dict)
    extensions: list[str] | None = None

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Facts:
        """The facts a backup recorded in its snapshot (or entry) meta."""
        tables = {str(k): int(v) for k, v in _mapping(meta.get("tables")).items()
                  if isinstance(v, int)}
        objects = {str(k): int(v) for k, v in _mapping(meta.get("object_counts")).items()
                   if isinstance(v, int)}
        return cls(tables, objects, _extension_names(meta.get("extensions")))


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _extension_names(value: Any) -> list[str] | None:
    if isinstance(value, Mapping):
        return sorted(str(k) for k in value)
    if isinstance(value, list):
        return sorted(str(v["name"]) if isinstance(v, Mapping) else str(v) for v in value)
    return None


def source_version(snap: Snapshot) -> str | None:
    """The PostgreSQL version the snapshot was taken from, as recorded in its meta."""
    for key in ("pg_version", "server_version"):
        value = snap.meta.get(key)
        if isinstance(value, int):  # server_version_num
            return f"{value // 10000}.{value % 10000}" if value >= 100000 else str(value)
        if isinstance(value, str) and value:
            return value
    return None


def source_major(snap: Snapshot) -> int | None:
    version = source_version(snap)
    digits = ""
    for ch in version or "":
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else None


def collect_facts(instance: Instance, dbname: str) -> Facts:
    """Facts of a restored database, read by the same code the backup used (facts.py)."""
    conn = instance.connect(dbname, autocommit=False)
    try:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        conn.execute("SET LOCAL row_security = off")  # as the backup counted
        found = database_facts(conn)
    finally:
        conn.close()  # read-only: nothing to commit, and closing never waits on a busy query
    return Facts.from_meta(found)


# ---------------------------------------------------------- logical restore


@dataclass
class Outcome:
    """How a restore step ended: `summary` names the first error when not ok."""

    ok: bool
    summary: str
    verified: str | None = None  # physical: pg_verifybackup already passed


def logical_database(snap: Snapshot, database: str | None) -> str:
    """The database a logical snapshot holds (one per snapshot)."""
    recorded = snap.meta.get("database")
    if database is not None and recorded not in (None, database):
        raise DrillError(f"snapshot {snap.short_id} is of database {recorded!r}, "
                         f"not {database!r}")
    name = database or recorded
    if not isinstance(name, str) or not name:
        raise DrillError(f"logical snapshot {snap.short_id} records no database name; "
                         "pass the database to drill")
    return name


def globals_of(kloset: Kloset, snap: Snapshot) -> Snapshot | None:
    """The globals snapshot (roles) taken in the same backup run, if any."""
    run_id = snap.meta.get("run_id")
    if not run_id:
        return None
    found = [s for s in kloset.snapshots()
             if s.kind == "globals" and s.meta.get("run_id") == run_id]
    return found[-1] if found else None


def restore_globals_snapshot(kloset: Kloset, snap: Snapshot, instance: Instance,
                             counter: _ByteCounter, say: Log) -> Outcome:
    """Roles first, so the database restores with its real owners and grants."""
    from pgkloset_core.postgres.restore_logical import restore_globals

    try:
        kloset.prepare_read(snap)  # cold storage: thaw first
        restore_globals(kloset, snap, instance.dsn("postgres"),
                        bin_dir=str(instance.binaries.bin_dir), log=say)
    except KlosetError as exc:
        return Outcome(False, _one_line(exc))
    counter(snap.logical_bytes)
    return Outcome(True, "psql exited 0, no errors")


def restore_logical_snapshot(kloset: Kloset, snap: Snapshot, dbname: str, instance: Instance,
                             counter: _ByteCounter, say: Log, *, no_owner: bool) -> Outcome:
    """The product's logical restore (pg_restore --exit-on-error) into a new database."""
    from pgkloset_core.postgres.restore_logical import restore_logical

    try:
        result = restore_logical(kloset, snap, instance.dsn(dbname), create=True,
                                 no_owner=no_owner, bin_dir=str(instance.binaries.bin_dir),
                                 log=say, progress=counter)
    except KlosetError as exc:
        return Outcome(False, _one_line(exc))
    notes = f" ({'; '.join(result.warnings)})" if result.warnings else ""
    return Outcome(True, f"pg_restore exited 0, no errors{notes}")


# --------------------------------------------------------- physical restore


def restore_physical_snapshot(kloset: Kloset, snap: Snapshot, data_dir: Path,
                              binaries: PgBinaries, *, counter: _ByteCounter,
                              log: Log) -> Outcome:
    """Rebuild the data directory with the product's physical restore (verify included)."""
    from pgkloset_core.postgres.physical import restore_physical

    try:
        result = restore_physical(kloset, snap, to_dir=str(data_dir),
                                  pg_bin=str(binaries.bin_dir), progress=counter, log=log)
    except KlosetError as exc:
        return Outcome(False, _one_line(exc))
    _prepare_data_dir(data_dir)
    return Outcome(True, f"{result.file_count} files, {result.bytes_written} bytes restored",
                   verified="manifest matches" if result.verified else None)


def _prepare_data_dir(data_dir: Path) -> None:
    """A drill copy never follows a primary, and starts even when config lived elsewhere."""
    (data_dir / "standby.signal").unlink(missing_ok=True)
    st = data_dir.stat()
    for name in ("postgresql.conf", "pg_ident.conf"):
        path = data_dir / name
        if not path.exists():
            path.write_text("# written by pgkloset drill: the snapshot had none\n")
            os.chown(path, st.st_uid, st.st_gid)


def verify_backup(data_dir: Path, binaries: PgBinaries) -> CheckResult:
    """pg_verifybackup against the backup manifest, when the snapshot carries one."""
    name = "pg_verifybackup"
    if not (data_dir / "backup_manifest").is_file():
        return CheckResult(name, True, "manifest matches", "no backup_manifest in snapshot",
                           skipped=True)
    if not binaries.has("pg_verifybackup"):
        return CheckResult(name, True, "manifest matches", "pg_verifybackup not installed",
                           skipped=True)
    done = subprocess.run([str(binaries.path("pg_verifybackup")), "--quiet", str(data_dir)],
                          capture_output=True, text=True, timeout=3600)
    if done.returncode == 0:
        return CheckResult(name, True, "manifest matches", "manifest matches")
    lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
    first = lines[0] if lines else f"exit {done.returncode}"
    return CheckResult(name, False, "manifest matches", f"exit {done.returncode}",
                       f"{name}: {first}" + (f" (+{len(lines) - 1} more)" if len(lines) > 1
                                             else ""))


def cluster_databases(instance: Instance) -> list[str]:
    rows = instance.execute("SELECT datname FROM pg_database WHERE datallowconn "
                            "AND NOT datistemplate ORDER BY datname")
    return [r[0] for r in rows]


def physical_facts(snap: Snapshot) -> dict[str, Facts]:
    """Per-database facts recorded with a physical snapshot, if the backup recorded any."""
    databases = _mapping(snap.meta.get("databases"))
    found = {str(db): Facts.from_meta(_mapping(doc)) for db, doc in databases.items()
             if isinstance(doc, Mapping) and "tables" in doc}
    if not found and "tables" in snap.meta and snap.meta.get("database"):
        found[str(snap.meta["database"])] = Facts.from_meta(snap.meta)
    return found


def default_database(snap: Snapshot, databases: Sequence[str]) -> str:
    recorded = snap.meta.get("database")
    if isinstance(recorded, str) and recorded in databases:
        return recorded
    return "postgres" if "postgres" in databases or not databases else databases[0]


def read_every_table(instance: Instance, dbname: str) -> CheckResult:
    """Without recorded counts, at least every table must be readable to its end."""
    name = f"read tables {dbname}"
    try:
        facts = collect_facts(instance, dbname)
    except Exception as exc:
        return CheckResult(name, False, "every table readable", type(exc).__name__,
                           f"{name}: {_one_line(exc)}")
    rows = sum(facts.tables.values())
    return CheckResult(name, True, "every table readable",
                       f"{len(facts.tables)} tables, {rows} rows")


def amcheck(instance: Instance, databases: Sequence[str]) -> CheckResult:
    """pg_amcheck --all: heap and btree consistency of every database of the cluster."""
    name = "pg_amcheck"
    available = instance.scalar(
        "SELECT count(*) FROM pg_available_extensions WHERE name = 'amcheck'")
    if not available or not instance.binaries.has("pg_amcheck"):
        return CheckResult(name, True, "no corruption", "amcheck not installed with "
                           f"PostgreSQL {instance.binaries.version}", skipped=True)
    cmd = [str(instance.binaries.path("pg_amcheck")), "--all", "--install-missing",
           "--heapallindexed"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=instance.env("postgres"),
                          timeout=3600)
    out = [ln.strip() for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
    if done.returncode == 0 and not out:
        return CheckResult(name, True, "no corruption", f"{len(databases)} databases clean")
    first = next((ln for ln in out if "error" in ln.lower() or "corrupt" in ln.lower()),
                 out[0] if out else f"exit {done.returncode}")
    return CheckResult(name, False, "no corruption", f"exit {done.returncode}",
                       f"{name}: {first}" + (f" (+{len(out) - 1} more lines)" if len(out) > 1
                                             else ""))


def run_sql_check(instance: Instance, name: str, sql: str, dbname: str) -> CheckResult:
    """A user query, read-only, that must return exactly one row holding true."""
    label = f"sql {name}"
    try:
        conn = instance.connect(dbname, options="-c default_transaction_read_only=on")
    except Exception as exc:
        return CheckResult(label, False, True, "error", f"{label}: {_one_line(exc)}")
    try:
        cur = conn.execute(sql.encode())
        rows: list[tuple[Any, ...]] = []
        while True:
            if cur.description is not None:
                rows = cur.fetchall()
            if not cur.nextset():
                break
    except Exception as exc:
        return CheckResult(label, False, True, "error", f"{label}: {_one_line(exc)}")
    finally:
        conn.close()  # no rollback: after an interrupt the connection may still be busy
    ok = rows == [(True,)]
    actual: Any = rows[0][0] if len(rows) == 1 and len(rows[0]) == 1 else rows[:3]
    message = "" if ok else (f"{label}: returned {actual!r}, expected a single true")
    return CheckResult(label, ok, True, actual, message)


def postgres_pids_under(path: str | os.PathLike[str]) -> list[int]:
    """Processes whose working directory is under `path` (a postmaster and its backends)."""
    prefix = str(Path(path))
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd").removesuffix(" (deleted)")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state in ("Z", "X"):
            continue
        if cwd == prefix or cwd.startswith(prefix + "/"):
            found.append(int(entry.name))
    return found
