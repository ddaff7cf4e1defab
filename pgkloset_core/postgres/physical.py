"""Physical backups (pg_basebackup) and restores of a whole PostgreSQL cluster.

Backup: ``pg_basebackup -D - -Ft -X fetch`` writes one tar stream holding the
data files, the WAL segments the backup needs, ``backup_label`` and
``backup_manifest``. The stream is read member by member (tarfile stream
mode) and every member becomes its own snapshot entry, so unchanged files
deduplicate across backups and nothing is staged on local disk.

Restore: the entries are written into ``DIR.partial`` with the top-level
``PG_VERSION`` held back until everything else is on disk, past the page
cache where the filesystem allows (filewrite.py), each file's checksum
checked against ``backup_manifest`` as it is written (manifest.py), the rest
checked by ``pg_verifybackup --skip-checksums``, then renamed to ``DIR``.
A restore killed at any point
leaves at most a ``.partial`` directory, never something that looks like a
cluster. The major version of the target binaries is checked before a byte
is written: a data directory only starts under its own major version.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import pwd
import re
import shutil
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from pgkloset_core.errors import KlosetError, UsageError
from pgkloset_core.kloset.reader import iter_entries
from pgkloset_core.kloset.repository import Kloset, ready
from pgkloset_core.kloset.snapshot import Entry, Snapshot
from pgkloset_core.postgres.binaries import NoSuitableBinaries, PgBinaries, find_binaries
from pgkloset_core.postgres.filewrite import FileWriter
from pgkloset_core.postgres.manifest import ChecksumMismatch, ManifestChecksums
from pgkloset_core.postgres.pgenv import (
    BackupCancelled,
    ConnTarget,
    ToolFailed,
    ToolProcess,
    tool_env,
)
from pgkloset_core.procs import pid_alive

KIND = "physical"
CLUSTER_DATABASE = "*cluster*"  # meta["database"] of a physical snapshot: all of them
FORMAT = "pg_basebackup-tar/1"
Log = Callable[[str], None]
Progress = Callable[[int], None]

_CAPTURE = {"PG_VERSION": 64, "backup_label": 64 * 1024, "global/pg_control": 8192}
_MANIFEST_TAIL = 64 * 1024


class PhysicalBackupError(KlosetError):
    """A physical backup cannot be made; the message says what to change."""


class PhysicalRestoreError(KlosetError):
    """A physical snapshot cannot be restored where or how it was asked."""


@dataclass(frozen=True)
class PhysicalBackupResult:
    snapshot_id: str
    logical_bytes: int
    stored_bytes: int
    seconds: float
    pg_version: str
    system_identifier: str
    file_count: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PhysicalRestoreResult:
    snapshot_id: str
    data_dir: str
    pg_major: int
    binaries: str  # bin dir checked against the snapshot's major version
    file_count: int
    bytes_written: int
    seconds: float
    verified: bool  # pg_verifybackup passed (False: no manifest or tool, see notes)
    started: bool = False
    port: int | None = None
    socket_dir: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ------------------------------------------------------------------ pre-checks

_PRECHECK_SQL = """
SELECT current_setting('server_version_num')::int, current_setting('server_version'),
       current_setting('wal_level'), current_setting('max_wal_senders')::int,
       (SELECT count(*) FROM pg_stat_replication),
       r.rolsuper, r.rolreplication, current_user,
       current_setting('data_checksums'),
       (SELECT count(*) FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global')),
       (SELECT rolname FROM pg_roles WHERE oid = 10)
FROM pg_roles r WHERE r.rolname = current_user
"""


@dataclass(frozen=True)
class ServerFacts:
    version_num: int
    version: str
    wal_level: str
    max_wal_senders: int
    wal_senders_busy: int
    superuser: bool
    replication: bool
    role: str
    data_checksums: bool
    extra_tablespaces: int
    bootstrap_superuser: str

    @property
    def major(self) -> int:
        return self.version_num // 10000


def server_facts(target: ConnTarget) -> ServerFacts:
    """What the pre-checks need, read over an ordinary connection."""
    with target.connect(connect_timeout=int(target.params.get("connect_timeout", 15))) as conn:
        row = conn.execute(_PRECHECK_SQL).fetchone()
    if row is None:
        raise PhysicalBackupError("cannot read the current role from pg_roles")
    return ServerFacts(int(row[0]), str(row[1]).split()[0], str(row[2]), int(row[3]),
                       int(row[4]), bool(row[5]), bool(row[6]), str(row[7]), row[8] == "on",
                       int(row[9]), str(row[10]))


def _msg_wal_level(level: str) -> str:
    return (f"wal_level is {level} on the server; a base backup needs wal_level = replica "
            "(and max_wal_senders > 0): set both in postgresql.conf and restart the server")


def _msg_no_senders() -> str:
    return ("max_wal_senders is 0 on the server, so it accepts no replication connection: set "
            "max_wal_senders to at least 2 in postgresql.conf and restart the server")


def _msg_no_replication(role: str | None) -> str:
    who = f"role {role}" if role else "the connecting role"
    how = _ident(role) if role else "<role>"
    return (f"{who} lacks the REPLICATION privilege that pg_basebackup needs: run "
            f"ALTER ROLE {how} REPLICATION as a superuser, or connect as a role that has it")


def _msg_busy(busy: int | None, limit: int | str) -> str:
    used = f"all {limit}" if busy is None else f"{busy} of {limit}"
    return (f"no free WAL sender slot: {used} (max_wal_senders) are in use by other "
            "replication connections; raise max_wal_senders (restart needed) or wait for "
            "one of them to finish")


def _msg_tablespaces(count: int | str) -> str:
    return (f"the cluster has {count} tablespace(s) besides pg_default and pg_global; "
            "pg_basebackup can stream only a single tablespace as one tar to standard output "
            "(-D - -Ft), so pgkloset cannot back this cluster up physically: use logical "
            "snapshots (pgkloset backup), or move the tables back to pg_default")


def _ident(name: str) -> str:
    return name if re.fullmatch(r"[a-z_][a-z0-9_$]*", name) else '"' + name.replace('"', '""') + '"'


def precheck(facts: ServerFacts) -> None:
    """Refuse, with what to change, settings and privileges that make pg_basebackup fail."""
    if facts.wal_level == "minimal":
        raise PhysicalBackupError(_msg_wal_level(facts.wal_level))
    if facts.max_wal_senders == 0:
        raise PhysicalBackupError(_msg_no_senders())
    if not (facts.superuser or facts.replication):
        raise PhysicalBackupError(_msg_no_replication(facts.role))
    if facts.wal_senders_busy >= facts.max_wal_senders:
        raise PhysicalBackupError(_msg_busy(facts.wal_senders_busy, facts.max_wal_senders))
    if facts.extra_tablespaces:
        raise PhysicalBackupError(_msg_tablespaces(facts.extra_tablespaces))


_STDERR_RULES: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(r"requested standby connections exceeds max_wal_senders \(currently 0\)"),
     lambda m: _msg_no_senders()),
    (re.compile(r"requested standby connections exceeds max_wal_senders \(currently (\d+)\)"),
     lambda m: _msg_busy(None, m.group(1))),
    (re.compile(r"must be superuser or replication role|permission denied to start WAL sender"),
     lambda m: _msg_no_replication(None)),
    (re.compile(r"WAL level not sufficient|wal_level must be set to \"?(replica|logical)"),
     lambda m: _msg_wal_level("minimal")),
    (re.compile(r"can only write single tablespace to stdout, database has (\d+)"),
     lambda m: _msg_tablespaces(int(m.group(1)) - 1)),
    (re.compile(r"no pg_hba\.conf entry for replication connection[^,]*, user \"([^\"]+)\""),
     lambda m: f"pg_hba.conf has no line allowing replication connections for user "
               f"{m.group(1)}: add e.g. 'host replication {m.group(1)} <client address> "
               "scram-sha-256' (the database column must say replication) and reload"),
    (re.compile(r"all replication slots are in use"),
     lambda m: "no free replication slot: raise max_replication_slots (restart needed) or drop "
               "an unused slot"),
    (re.compile(r"requested WAL segment \S+ has already been removed"),
     lambda m: "the server removed WAL the backup needs before pg_basebackup fetched it; raise "
               "wal_keep_size on the server so WAL written during a backup is kept, then retry"),
    (re.compile(r"password authentication failed for user \"([^\"]+)\"|no password supplied"),
     lambda m: "the server refused the password: pass it in the DSN, PGPASSWORD or a passfile"),
]


def explain_basebackup_failure(stderr: str) -> str | None:
    """One line saying what to change, for pg_basebackup errors we recognise."""
    for pattern, message in _STDERR_RULES:
        match = pattern.search(stderr)
        if match:
            return message(match)
    return None


# --------------------------------------------------------------------- backup


class _Cancellable(io.RawIOBase):
    """pg_basebackup's stdout, failing fast once the caller asks to stop."""

    def __init__(self, raw: Any, cancel: threading.Event | None) -> None:
        self._raw = raw
        self._cancel = cancel

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._cancel is not None and self._cancel.is_set():
            raise BackupCancelled("physical backup cancelled; nothing was committed")
        return int(self._raw.readinto(b))


class _Capture(io.RawIOBase):
    """A member's stream that keeps a bounded copy (head or tail) for the metadata."""

    def __init__(self, inner: Any, limit: int, *, tail: bool = False) -> None:
        self._inner = inner
        self._limit = limit
        self._tail = tail
        self.data = bytearray()

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = int(self._inner.readinto(b))
        if n:
            self.data += bytes(memoryview(b)[:n])
            if len(self.data) > self._limit:
                if self._tail:
                    del self.data[:len(self.data) - self._limit]
                else:
                    del self.data[self._limit:]
        return n


def _member_name(name: str) -> str:
    clean = posixpath.normpath(name)
    if clean.startswith(("/", "../")) or clean in ("..", ".", ""):
        raise PhysicalBackupError(f"pg_basebackup sent an unexpected member path {name!r}")
    return clean


def _owner_attrs(m: tarfile.TarInfo) -> dict[str, Any]:
    return {"mode": m.mode & 0o7777, "uid": m.uid, "gid": m.gid, "user": m.uname or None,
            "group": m.gname or None, "mtime": float(m.mtime)}


@dataclass
class _StreamFacts:
    files: int = 0
    captured: dict[str, bytes] = field(default_factory=dict)


def _store_tar(writer: Any, stream: Any, progress: Progress | None) -> _StreamFacts:
    """Every tar member as its own entry, straight from the stream."""
    facts = _StreamFacts()
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            name = _member_name(member.name)
            attrs = _owner_attrs(member)
            if member.isdir():
                writer.add_special(name, "dir", **attrs)
            elif member.issym():
                writer.add_special(name, "symlink", target=member.linkname, **attrs)
            elif member.isreg():
                source = tar.extractfile(member)
                assert source is not None
                capture: _Capture | None = None
                if name in _CAPTURE:
                    capture = _Capture(source, _CAPTURE[name])
                elif name == "backup_manifest":
                    capture = _Capture(source, _MANIFEST_TAIL, tail=True)
                # Pages change in place: fixed-size chunks dedup as well as content-defined
                # ones and skip the chunker's pass over every byte.
                writer.add_stream(name, capture or source, entry_type="file",
                                  progress=progress, fixed=True, **attrs)
                if capture is not None:
                    facts.captured[name] = bytes(capture.data)
                facts.files += 1
            else:
                raise PhysicalBackupError(
                    f"pg_basebackup sent {name!r} of a kind pgkloset does not store "
                    f"(tar type {member.type!r})")
    return facts


def _label_field(label: str, key: str) -> str | None:
    match = re.search(rf"^{key}: (.+)$", label, re.M)
    return match.group(1).strip() if match else None


def _backup_meta(facts: ServerFacts, stream: _StreamFacts, stderr: str, tool: PgBinaries,
                 server: str, total: int) -> dict[str, Any]:
    label = stream.captured.get("backup_label", b"").decode("utf-8", "replace")
    start = _label_field(label, "START WAL LOCATION")
    timeline = _label_field(label, "START TIMELINE")
    stop_match = re.search(r"write-ahead log end point: (\S+)", stderr)
    stop = stop_match.group(1) if stop_match else None
    tail = stream.captured.get("backup_manifest", b"").decode("utf-8", "replace")
    ranges = re.findall(r'"Timeline": (\d+), "Start-LSN": "([^"]+)", "End-LSN": "([^"]+)"', tail)
    if ranges:
        stop = stop or ranges[-1][2]
    control = stream.captured.get("global/pg_control", b"")
    sysid = str(int.from_bytes(control[:8], "little")) if len(control) >= 8 else None
    pg_version_file = stream.captured.get("PG_VERSION", b"").decode().strip()
    return {
        "server": server,
        "database": CLUSTER_DATABASE,
        "format": FORMAT,
        "pg_version": facts.version,
        "pg_major": int(pg_version_file.split(".")[0]) if pg_version_file else facts.major,
        "pg_version_file": pg_version_file,
        "server_version_num": facts.version_num,
        "system_identifier": sysid,
        "timeline": int(timeline) if timeline and timeline.isdigit() else None,
        "start_lsn": start.split()[0] if start else None,
        "stop_lsn": stop,
        "backup_label": label,
        "total_bytes": total,
        "file_count": stream.files,
        "pg_basebackup_version": tool.version,
        "data_checksums": facts.data_checksums,
        "wal_method": "fetch",
        "manifest": "backup_manifest" in stream.captured,
        "bootstrap_superuser": facts.bootstrap_superuser,
        "role": facts.role,
    }


def _basebackup_binaries(major: int, bin_dir: str | os.PathLike[str] | None) -> PgBinaries:
    if bin_dir is not None:
        bins = PgBinaries.from_dir(bin_dir, tool="pg_basebackup")
        if bins.major != major:
            raise PhysicalBackupError(
                f"the server runs PostgreSQL {major} but pg_basebackup in {bins.bin_dir} is "
                f"{bins.version}; pg_basebackup must match the server's major version")
        return bins
    return find_binaries(exact_major=major, tool="pg_basebackup")


def backup_physical(kloset: Kloset | Future[Kloset], dsn: str | None, *,
                    tags: Iterable[str] = (),
                    fast_checkpoint: bool = False, server: str | None = None,
                    bin_dir: str | os.PathLike[str] | None = None, lock_wait: float = 0.0,
                    log: Log | None = None, cancel: threading.Event | None = None,
                    progress: Progress | None = None) -> PhysicalBackupResult:
    """Snapshot the whole cluster at `dsn` with pg_basebackup, file by file."""
    target = ConnTarget.parse(dsn)
    facts = server_facts(target)
    precheck(facts)
    tool = _basebackup_binaries(facts.major, bin_dir)
    name = server or target.label()
    argv: list[str | os.PathLike[str]] = [
        tool.path("pg_basebackup"), "-d", target.conninfo(), "-D", "-", "-Ft", "-X", "fetch",
        "--manifest-checksums=CRC32C", "-v", "--no-password",
        "-c", "fast" if fast_checkpoint else "spread", "-l", f"pgkloset {name}"]
    if log:
        log(f"pg_basebackup {tool.version} from {name} (PostgreSQL {facts.version})")
    started = time.monotonic()
    kloset = ready(kloset)  # may have been unlocking meanwhile (Kloset.open_soon)
    with kloset.lock(exclusive=False, operation="backup", wait=lock_wait) as lock, \
            kloset.writer(kind=KIND, tags=list(tags), lock=lock) as writer, \
            tool_env(target) as env, \
            ToolProcess(argv, env, what="pg_basebackup", stdout=subprocess.PIPE, log=log,
                        cancel=cancel) as proc:
        try:
            stream = _store_tar(writer, _Cancellable(proc.stdout, cancel), progress)
        except BackupCancelled:
            proc.kill()
            raise
        except (tarfile.TarError, OSError) as exc:
            # Usually pg_basebackup died mid-stream: its stderr says why.
            try:
                proc.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            _raise_tool_failure(proc, cancel)
            raise PhysicalBackupError(f"cannot read pg_basebackup's tar stream: {exc}") from None
        except BaseException:
            proc.kill()
            raise
        _raise_tool_failure(proc, cancel)
        stderr = "\n".join(proc.tail)
        writer.meta.update(_backup_meta(facts, stream, stderr, tool, name, writer.logical_bytes))
        if writer.meta["pg_major"] != facts.major:
            raise PhysicalBackupError(
                f"PG_VERSION says {writer.meta['pg_major']} but the server reports "
                f"{facts.version}; refusing to record a confusing snapshot")
        snap = writer.commit()
    result = PhysicalBackupResult(
        snapshot_id=snap.id, logical_bytes=int(snap.summary["logical_bytes"]),
        stored_bytes=int(snap.summary["stored_bytes"]),
        seconds=round(time.monotonic() - started, 3), pg_version=facts.version,
        system_identifier=str(snap.meta.get("system_identifier") or ""),
        file_count=int(snap.meta["file_count"]))
    if log:
        log(f"snapshot {snap.short_id}: {result.file_count} files, "
            f"{result.logical_bytes} bytes, {result.stored_bytes} new bytes stored")
    return result


def _raise_tool_failure(proc: ToolProcess, cancel: threading.Event | None) -> None:
    """Wait for pg_basebackup; a failure becomes the clearest line we can give."""
    try:
        proc.check()
    except BackupCancelled:
        raise
    except ToolFailed as exc:
        if cancel is not None and cancel.is_set():
            raise BackupCancelled("physical backup cancelled; nothing was committed") from None
        explained = explain_basebackup_failure("\n".join(proc.stderr_lines()))
        if explained:
            raise PhysicalBackupError(explained) from None
        raise PhysicalBackupError(str(exc)) from None


# -------------------------------------------------------------------- restore


def _restore_binaries(major: int, pg_bin: str | os.PathLike[str] | None) -> PgBinaries:
    """Binaries of exactly the snapshot's major version, or a refusal naming both."""
    if pg_bin is not None:
        bins: PgBinaries | None = None
        for tool in ("postgres", "pg_ctl", "pg_verifybackup"):
            with contextlib.suppress(NoSuitableBinaries):
                bins = PgBinaries.from_dir(pg_bin, tool=tool)
                break
        if bins is None:
            raise PhysicalRestoreError(f"no PostgreSQL server binaries in {pg_bin}")
        if bins.major != major:
            raise PhysicalRestoreError(
                f"the snapshot holds a PostgreSQL {major} cluster but the binaries in "
                f"{bins.bin_dir} are PostgreSQL {bins.version}; a data directory only starts "
                f"under its own major version: use PostgreSQL {major} binaries, or a logical "
                "snapshot to move between versions")
        return bins
    try:
        return find_binaries(exact_major=major, tool="postgres")
    except NoSuitableBinaries as exc:
        raise PhysicalRestoreError(
            f"the snapshot holds a PostgreSQL {major} cluster: {exc}") from None


def _server_owner() -> tuple[int, int] | None:
    """(uid, gid) of the postgres OS user when we are root: postgres must own its files."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise PhysicalRestoreError(
            "running as root, but there is no OS user 'postgres' to own the restored data "
            "directory; create it or restore as the user that will run the server") from None
    return entry.pw_uid, entry.pw_gid



def _check_target(target: Path, partial: Path, force: bool) -> bool:
    """Refuse unusable targets before writing; True when the target must be replaced."""
    if target.exists() and not target.is_dir():
        raise PhysicalRestoreError(f"{target} exists and is not a directory")
    contents = list(target.iterdir()) if target.is_dir() else []
    pidfile = target / "postmaster.pid"
    if pidfile.is_file():
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pidfile.read_text().split()[0])
            if pid_alive(pid):
                raise PhysicalRestoreError(
                    f"a PostgreSQL server (pid {pid}) is running on {target}; stop it first")
    if contents and not force:
        raise PhysicalRestoreError(
            f"{target} is not empty ({len(contents)} entries); restore into an empty or new "
            "directory, or pass --force to replace its contents")
    if partial.exists() and not force:
        raise PhysicalRestoreError(
            f"{partial} is left over from an interrupted restore; remove it or pass --force")
    if not target.parent.is_dir():
        raise PhysicalRestoreError(f"the parent directory of {target} does not exist")
    if target.exists() and os.path.ismount(target):
        raise PhysicalRestoreError(
            f"{target} is a mount point; restore into a directory inside it (pgkloset writes "
            "a sibling .partial directory and renames it into place)")
    return bool(contents)


class _Extractor:
    """Writes entries under one root, never following a path out of it."""

    def __init__(self, kloset: Kloset, snap: Snapshot, root: Path,
                 owner: tuple[int, int] | None, progress: Progress | None,
                 files: FileWriter, checksums: ManifestChecksums | None) -> None:
        self.kloset = kloset
        self.out = files
        self.checksums = checksums
        self.snap = snap
        self.root = root
        self.real_root = os.path.realpath(root)
        self.owner = owner
        self.progress = progress
        self.bytes_written = 0
        self.files = 0
        self.dir_attrs: list[tuple[Path, Entry]] = []
        self._safe_dirs: set[str] = {self.real_root}

    def path_of(self, entry: Entry) -> Path:
        name = posixpath.normpath(entry.name)
        if name.startswith(("/", "../")) or name in ("..", ".", ""):
            raise PhysicalRestoreError(
                f"snapshot {self.snap.short_id} has an entry outside the data directory: "
                f"{entry.name!r}")
        return self.root / name

    def _parent(self, path: Path) -> None:
        parent = str(path.parent)
        if parent in self._safe_dirs:
            return
        self.makedirs(path.parent)
        real = os.path.realpath(parent)
        if real != self.real_root and not real.startswith(self.real_root + os.sep):
            raise PhysicalRestoreError(f"{path} would be written outside the data directory")
        self._safe_dirs.add(parent)

    def makedirs(self, path: Path) -> None:
        missing = []
        while not path.exists():
            missing.append(path)
            path = path.parent
        for p in reversed(missing):
            p.mkdir(mode=0o700)
            self._chown(p)

    def _chown(self, path: Path, follow: bool = True) -> None:
        if self.owner is not None:
            if follow:
                os.chown(path, *self.owner)
            else:
                os.lchown(path, *self.owner)

    def _write_node(self, entry: Entry) -> None:
        """A directory or a symlink (files go through write_all)."""
        path = self.path_of(entry)
        self._parent(path)
        if entry.type == "dir":
            if not path.is_dir():
                path.mkdir(mode=0o700)
                self._chown(path)
            self.dir_attrs.append((path, entry))
        elif entry.type == "symlink":
            os.symlink(entry.target or "", path)
            self._chown(path, follow=False)
        else:
            raise PhysicalRestoreError(f"entry {entry.name!r} has unknown type {entry.type!r}")

    def write_all(self, entries: Sequence[Entry]) -> None:
        """Every entry in snapshot order (a directory before what it holds).

        The files' bytes come through one read pipeline (kloset/reader.py),
        so the readers do not drain at the end of each of a data directory's
        thousand-odd files.
        """
        files = [e for e in entries if e.type in ("file", "stream")]
        with contextlib.closing(iter_entries(self.kloset, self.snap, files)) as chunks:
            pending = next(chunks, None)
            n = 0
            for entry in entries:
                if entry.type in ("file", "stream"):
                    pending = self._write_file(entry, n, pending, chunks)
                    n += 1
                else:
                    self._write_node(entry)

    def _write_file(self, entry: Entry, n: int, pending: tuple[int, bytes] | None,
                    chunks: Iterator[tuple[int, bytes]]) -> tuple[int, bytes] | None:
        """Write file ``n`` of the read pipeline from its chunks; returns the next file's first."""
        path = self.path_of(entry)
        self._parent(path)
        mode = (entry.mode if entry.mode is not None else 0o600) & 0o777
        check = self.checksums.check_for(entry.name) if self.checksums else None
        f = self.out.create(path)
        try:
            while pending is not None and pending[0] == n:
                data = pending[1]
                f.write(data)
                if check is not None:
                    check.update(data)
                self.bytes_written += len(data)
                if self.progress:
                    self.progress(len(data))
                pending = next(chunks, None)
            f.finish()
            os.fchmod(f.fd, mode)
            if self.owner is not None:
                os.fchown(f.fd, *self.owner)
        finally:
            f.close()
        if check is not None:
            try:
                check.verify()
            except ChecksumMismatch as exc:
                raise PhysicalRestoreError(f"the restored files do not match the backup "
                                           f"manifest: {exc}") from None
        if entry.mtime is not None:
            os.utime(path, (entry.mtime, entry.mtime))
        self.files += 1
        return pending

    def finish_dirs(self) -> None:
        """Directory modes and mtimes last: writing files into them changes mtimes."""
        for path, entry in reversed(self.dir_attrs):
            mode = (entry.mode if entry.mode is not None else 0o700) & 0o777
            os.chmod(path, mode | 0o700)
            if entry.mtime is not None:
                os.utime(path, (entry.mtime, entry.mtime))


def _read_checksums(kloset: Kloset, snap: Snapshot) -> ManifestChecksums | None:
    """The file checksums of the snapshot's backup_manifest, checked as the files are written."""
    entry = snap.entry("backup_manifest")
    if entry is None or entry.type != "file":
        return None
    return ManifestChecksums.parse(b"".join(kloset.read_entry(snap, entry)))


def _verify(bins: PgBinaries, data_dir: Path, log: Log | None,
            checksums_done: bool) -> tuple[bool, str | None]:
    """pg_verifybackup with the manifest and the WAL in pg_wal; (passed, note).

    ``checksums_done``: the restore checked every file's checksum as it wrote
    it, so pg_verifybackup checks the rest (files present, sizes, the manifest's
    own checksum, the WAL) without reading the files back.
    """
    if not (data_dir / "backup_manifest").is_file():
        return False, "the snapshot has no backup_manifest: pg_verifybackup skipped"
    if not bins.has("pg_verifybackup"):
        done = "file checksums checked; " if checksums_done else ""
        return False, (f"pg_verifybackup is not installed in {bins.bin_dir}: {done}"
                       "file list, sizes and WAL not checked")
    argv = [str(bins.path("pg_verifybackup")), "--quiet"]
    if checksums_done:
        argv.append("--skip-checksums")
    if not bins.has("pg_waldump"):
        argv.append("--no-parse-wal")
    done = subprocess.run([*argv, str(data_dir)], capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        first = lines[0] if lines else f"exit {done.returncode}"
        more = f" (+{len(lines) - 1} more)" if len(lines) > 1 else ""
        raise PhysicalRestoreError(f"pg_verifybackup rejected the restored files: {first}{more}")
    if log:
        log("pg_verifybackup: the restored files match the backup manifest")
    return True, None


def restore_physical(kloset: Kloset, snapshot: Snapshot | str, *, to_dir: str,
                     force: bool = False, pg_bin: str | None = None, start: bool = False,
                     port: int | None = None, progress: Progress | None = None,
                     log: Log | None = None) -> PhysicalRestoreResult:
    """Rebuild a data directory from a physical snapshot (and optionally start it)."""
    snap = snapshot if isinstance(snapshot, Snapshot) else kloset.resolve(snapshot)
    if snap.kind != KIND:
        raise UsageError(f"snapshot {snap.short_id} is a {snap.kind} snapshot, not physical")
    try:
        major = int(snap.meta["pg_major"])
    except (KeyError, TypeError, ValueError):
        raise PhysicalRestoreError(
            f"snapshot {snap.short_id} records no PostgreSQL major version") from None
    bins = _restore_binaries(major, pg_bin)
    target = Path(to_dir).absolute()
    partial = target.with_name(target.name + ".partial")
    replace = _check_target(target, partial, force)
    owner = _server_owner()
    started = time.monotonic()
    if partial.exists():
        shutil.rmtree(partial)
    notes: list[str] = []
    try:
        partial.mkdir(mode=0o700)
        if owner is not None:
            os.chown(partial, *owner)
        held_back = [e for e in snap.entries if posixpath.normpath(e.name) == "PG_VERSION"]
        with kloset.lock(exclusive=False, operation="restore"), \
                contextlib.closing(FileWriter()) as files:
            checksums = _read_checksums(kloset, snap)
            ex = _Extractor(kloset, snap, partial, owner, progress, files, checksums)
            ex.write_all([e for e in snap.entries if e not in held_back])
            ex.finish_dirs()
            os.sync()  # everything durable before the file that makes it a cluster
            ex.write_all(held_back)
        os.chmod(partial, 0o700)
        verified, note = _verify(bins, partial, log,
                                 checksums_done=checksums is not None and checksums.complete)
        if note:
            notes.append(note)
        _swap_in(partial, target, replace)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    result = PhysicalRestoreResult(
        snapshot_id=snap.id, data_dir=str(target), pg_major=major, binaries=str(bins.bin_dir),
        file_count=ex.files, bytes_written=ex.bytes_written,
        seconds=round(time.monotonic() - started, 3), verified=verified, notes=notes)
    if log:
        log(f"restored {ex.files} files ({ex.bytes_written} bytes) into {target}")
    if start:
        _start(result, bins, target, port, owner, snap, log)
    return result


def _swap_in(partial: Path, target: Path, replace: bool) -> None:
    """Make the finished directory appear under its name in one rename."""
    old: Path | None = None
    if target.exists():
        if replace:
            old = target.with_name(f"{target.name}.old-{os.getpid()}")
            target.rename(old)
        else:
            target.rmdir()
    partial.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- start


def _ensure_config(target: Path, owner: tuple[int, int] | None, notes: list[str]) -> None:
    """Packagers keep the config outside the data directory: start with minimal files."""
    defaults = {"postgresql.conf": "# written by pgkloset restore: the backup had none\n",
                "pg_hba.conf": "# written by pgkloset restore: the backup had none\n"
                               "local all all peer\n"}
    for name, text in defaults.items():
        path = target / name
        if not path.exists():
            path.write_text(text)
            path.chmod(0o600)
            if owner is not None:
                os.chown(path, *owner)
            notes.append(f"the snapshot has no {name} (kept outside the data directory on the "
                         f"source); wrote a minimal one")


def _start(result: PhysicalRestoreResult, bins: PgBinaries, target: Path, port: int | None,
           owner: tuple[int, int] | None, snap: Snapshot, log: Log | None) -> None:
    """pg_ctl start as the postgres OS user; wait until recovery is over."""
    _ensure_config(target, owner, result.notes)
    logdir = target / "log"
    if not logdir.exists():
        logdir.mkdir(mode=0o700)
        if owner is not None:
            os.chown(logdir, *owner)
    argv = [str(bins.path("pg_ctl")), "-D", str(target), "-l", str(logdir / "pgkloset-start.log"),
            "-w", "-t", "600", "start"]
    if port is not None:
        argv[1:1] = ["-o", f"-p {int(port)}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    kwargs: dict[str, Any] = {}
    if owner is not None:
        kwargs = {"user": owner[0], "group": owner[1], "extra_groups": []}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=str(target),
                          timeout=900, **kwargs)
    if done.returncode != 0:
        tail = ""
        with contextlib.suppress(OSError):
            lines = (logdir / "pgkloset-start.log").read_text(errors="replace").splitlines()
            tail = " | ".join(ln for ln in lines[-3:] if ln.strip())
        said = (done.stderr or done.stdout).strip().splitlines()
        raise PhysicalRestoreError(
            f"the restored cluster in {target} did not start: "
            f"{said[-1] if said else f'pg_ctl exit {done.returncode}'}; log: {tail}")
    pid_lines = (target / "postmaster.pid").read_text().splitlines()
    result.started = True
    result.port = int(pid_lines[3])
    result.socket_dir = pid_lines[4].strip() or None
    _wait_recovery_done(result, bins, target, snap, log)


def _wait_recovery_done(result: PhysicalRestoreResult, bins: PgBinaries, target: Path,
                        snap: Snapshot, log: Log | None, timeout: float = 600) -> None:
    user = str(snap.meta.get("bootstrap_superuser") or "postgres")
    deadline = time.monotonic() + timeout
    error = ""
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(host=result.socket_dir, port=result.port, user=user,
                                 dbname="postgres", connect_timeout=5) as conn:
                if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:  # type: ignore
                    if log:
                        log(f"restored cluster is up on port {result.port}, out of recovery")
                    return
        except psycopg.Error as exc:
            error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "authentication" in error or "no pg_hba.conf entry" in error:
                break  # cannot ask over SQL: the control file says the same
        time.sleep(0.2)
    state = _cluster_state(bins, target)
    if state == "in production":
        result.notes.append(f"could not connect as {user} to ask pg_is_in_recovery() "
                            f"({error}); pg_controldata says the cluster is in production")
        return
    raise PhysicalRestoreError(
        f"the restored cluster in {target} started but did not finish recovery "
        f"(state: {state or 'unknown'}; {error or 'timed out'})")


def _cluster_state(bins: PgBinaries, target: Path) -> str | None:
    if not bins.has("pg_controldata"):
        return None
    done = subprocess.run([str(bins.path("pg_controldata")), str(target)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "LC_ALL": "C"})
    match = re.search(r"^Database cluster state:\s+(.+)$", done.stdout, re.M)
    return match.group(1).strip() if match else None
