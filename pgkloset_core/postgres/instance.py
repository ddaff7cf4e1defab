"""Throwaway PostgreSQL servers for restore drills and tests.

A drill restores a dump that may be large, broken or hostile, so the server it
lands in is disposable: `initdb` into a private temporary directory as an
unprivileged OS user, a private unix socket directory, a free loopback port or
no TCP at all, fast unsafe settings (the data is thrown away), and optionally
its own network namespace so restored code cannot reach the network.

Cleanup is the point: `stop()` is idempotent and kills by pid when a polite
shutdown fails; live instances are stopped at interpreter exit and on
SIGINT/SIGTERM (chaining to the previous handlers); the postmaster gets a
parent-death signal so it dies with the process that started it; and
`sweep_stale()` removes directories (scratch instances' and drills') left by
processes that were SIGKILLed.

`InstanceProvider` is the interface a Docker-backed provider can implement;
`LocalInstanceProvider` runs the binaries found on this machine.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import psycopg
from psycopg.conninfo import make_conninfo

from pgkloset_core.errors import KlosetError
from pgkloset_core.postgres.binaries import PgBinaries, find_binaries

StopMode = Literal["smart", "fast", "immediate"]
DIR_PREFIX = "pgkloset-pg-"
DRILL_DIR_PREFIX = "pgkloset-drill-"  # a drill's work directory (drill.py), swept alike
_OWNER_FILE = "owner"
_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}

# Safe to lose: a scratch instance's data is disposable.
FAST_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "16MB",
    "max_connections": "50",
    "huge_pages": "off",
}


class InstanceError(KlosetError):
    """A scratch instance could not be created, started or queried."""


@dataclass(frozen=True)
class InstanceOptions:
    """How to build a scratch instance; every field has a sensible default."""

    superuser: str = "postgres"
    password: str | None = None  # superuser password, required for TCP logins
    tcp: bool | None = None  # None: TCP on 127.0.0.1 unless the network is isolated
    port: int | None = None  # None: a free port (or 5432 on the private socket only)
    wal_level: str | None = None
    max_wal_senders: int | None = None
    settings: Mapping[str, str | int | float | bool] = field(default_factory=dict)
    hba_lines: Sequence[str] = ()  # placed before the defaults, so they win
    isolate_network: bool = False
    locale: str = "C.UTF-8"
    data_checksums: bool = False
    die_with_parent: bool | None = None  # None: when started from the main thread
    base_dir: str | None = None  # where temporary directories go (default: tempdir)
    start_timeout: float = 60.0


class Instance(ABC):
    """A running PostgreSQL server and how to reach it."""

    host: str  # the unix socket directory (or a TCP host for remote providers)
    port: int
    superuser: str
    password: str | None
    tcp_host: str | None  # "127.0.0.1" when TCP is served, else None
    binaries: PgBinaries  # local tools matching the server's major version
    data_dir: Path | None
    isolated: bool

    @property
    def major(self) -> int:
        return self.binaries.major

    def dsn(self, dbname: str = "postgres", *, tcp: bool = False, user: str | None = None,
            password: str | None = None, **extra: Any) -> str:
        """A psycopg/libpq conninfo string; over the unix socket unless `tcp`."""
        if tcp and self.tcp_host is None:
            raise InstanceError("this instance serves no TCP (unix socket only)")
        params: dict[str, Any] = {
            "host": self.tcp_host if tcp else self.host,
            "port": self.port,
            "user": user or self.superuser,
            "dbname": dbname,
        }
        secret = password if password is not None else (
            self.password if user in (None, self.superuser) else None)
        if secret is not None:
            params["password"] = secret
        params.update(extra)
        return make_conninfo(**params)

    def env(self, dbname: str = "postgres") -> dict[str, str]:
        """libpq environment for child tools (passwords go here, never on argv)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(PGHOST=self.host, PGPORT=str(self.port), PGUSER=self.superuser,
                   PGDATABASE=dbname)
        if self.password is not None:
            env["PGPASSWORD"] = self.password
        return env

    def connect(self, dbname: str = "postgres", *, autocommit: bool = True,
                **kwargs: Any) -> psycopg.Connection[Any]:
        """A new psycopg connection as the superuser over the socket."""
        return psycopg.connect(self.dsn(dbname), autocommit=autocommit, **kwargs)

    def execute(self, sql: str, dbname: str = "postgres",
                params: Sequence[Any] | Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """Run SQL (several statements allowed without params); rows of the last result."""
        with self.connect(dbname) as conn:
            cur = conn.execute(sql.encode(), params)
            rows: list[tuple[Any, ...]] = []
            while True:
                if cur.description is not None:
                    rows = cur.fetchall()
                if not cur.nextset():
                    return rows

    def scalar(self, sql: str, dbname: str = "postgres") -> Any:
        """The first column of the first row of the last result."""
        rows = self.execute(sql, dbname)
        return rows[0][0] if rows else None

    def psql(self, sql: str, dbname: str = "postgres", *, check: bool = True) -> str:
        """Run a script through the real psql (meta-commands work); unaligned output."""
        cmd = [str(self.binaries.path("psql")), "-X", "-q", "-A", "-t",
               "-v", "ON_ERROR_STOP=1", "-d", dbname, "-f", "-"]
        done = subprocess.run(cmd, input=sql, capture_output=True, text=True,
                              env=self.env(dbname), timeout=600)
        if check and done.returncode != 0:
            raise InstanceError(f"psql failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    @abstractmethod
    def stop(self, mode: StopMode | None = None) -> None:
        """Stop the server and delete what was created for it; safe to call twice."""

    def __enter__(self) -> Instance:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


class InstanceProvider(ABC):
    """Makes scratch instances; local processes today, Docker containers later."""

    @abstractmethod
    def start(self, binaries: PgBinaries | int, options: InstanceOptions | None = None,
              **overrides: Any) -> Instance:
        """Start a fresh, empty instance of the given binaries or major version."""


# ----------------------------------------------------------------- OS user


@dataclass(frozen=True)
class OsUser:
    """The unprivileged user that owns and runs the server."""

    name: str
    uid: int
    gid: int

    @property
    def is_us(self) -> bool:
        return self.uid == os.geteuid()


def server_user(name: str = "postgres") -> OsUser:
    """`name` when we are root (postgres refuses to run as root), else ourselves."""
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid())
        return OsUser(me.pw_name, me.pw_uid, me.pw_gid)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise InstanceError(
            f"running as root, but there is no OS user {name!r} to run PostgreSQL as; "
            "create one (e.g. install the postgresql package) or run as a normal user"
        ) from None
    return OsUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _owner_kwargs(user: OsUser) -> dict[str, Any]:
    """subprocess arguments that run a child as `user` (no preexec_fn: thread-safe)."""
    if user.is_us:
        return {}
    return {"user": user.uid, "group": user.gid, "extra_groups": []}


def _server_env(home: Path) -> dict[str, str]:
    """The environment without libpq settings that would leak into the server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["HOME"] = str(home)
    env.setdefault("LC_ALL", "C.UTF-8")
    return env


def _traversable_by(path: Path, user: OsUser) -> bool:
    """Whether `user` can reach `path` by mode bits alone (a hint for errors)."""
    if user.uid == 0:
        return True
    for part in [path, *path.parents]:
        try:
            st = part.stat()
        except OSError:
            return False
        if st.st_uid == user.uid:
            bit = stat.S_IXUSR
        elif st.st_gid == user.gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


# ---------------------------------------------------- binaries the user runs


def usable_binaries(binaries: PgBinaries, user: OsUser,
                    cache_dir: Path | None = None) -> PgBinaries:
    """`binaries`, or a private copy when `user` cannot execute them where they are.

    A wheel's binaries (pgserver) may live in a venv under a directory the
    postgres user cannot enter; a self-contained install (bin/, lib/, share/)
    is copied once into a root-owned cache that is world-readable, keeping its
    place next to auditwheel's `<package>.libs` directory that its RPATH
    ($ORIGIN/../../../pgserver.libs) points at.
    """
    if user.is_us or _can_run(binaries.path("postgres"), user):
        return binaries
    root = binaries.install_root
    if not (root / "share").is_dir() or not (root / "lib").is_dir():
        raise InstanceError(
            f"OS user {user.name} cannot execute {binaries.bin_dir} and that install is not "
            "self-contained enough to copy; make it readable by that user"
        )
    cache = cache_dir or Path(os.environ.get("PGKLOSET_CACHE_DIR", "/var/cache/pgkloset"))
    key = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    target = cache / f"pginstall-{binaries.version}-{key}"
    bin_dir = target / root.parent.name / root.name / "bin"
    if not (bin_dir / "postgres").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        os.chmod(cache, 0o755)
        staging = Path(tempfile.mkdtemp(dir=cache, prefix=".staging-"))
        tree = staging / "tree"
        shutil.copytree(root, tree / root.parent.name / root.name, symlinks=True)
        libs = root.parent.parent / f"{root.parent.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, tree / libs.name, symlinks=True)
        _make_world_readable(tree)
        try:
            os.rename(tree, target)
        except OSError:  # another process won the race: use its copy
            pass
        shutil.rmtree(staging, ignore_errors=True)
    copy = PgBinaries(bin_dir, binaries.major, binaries.version, f"{binaries.source}, copied")
    if not _can_run(copy.path("postgres"), user):
        raise InstanceError(f"OS user {user.name} cannot execute {copy.bin_dir} either")
    return copy


def _make_world_readable(tree: Path) -> None:
    for dirpath, _dirs, files in os.walk(tree):
        os.chmod(dirpath, 0o755)
        for name in files:
            path = Path(dirpath) / name
            if not path.is_symlink():
                mode = path.stat().st_mode
                path.chmod(mode | 0o444 | (0o111 if mode & 0o100 else 0))


@lru_cache(maxsize=32)
def _can_run(exe: Path, user: OsUser) -> bool:
    try:
        subprocess.run([str(exe), "--version"], capture_output=True, check=True, timeout=30,
                       cwd="/", **_owner_kwargs(user))
    except (OSError, subprocess.SubprocessError):
        return False
    return True


# -------------------------------------------------------- network isolation


def _unshare_prefix() -> list[str]:
    """The command prefix that gives a child its own, empty network namespace."""
    if os.geteuid() == 0:
        return ["unshare", "--net", "--"]
    return ["unshare", "--user", "--map-current-user", "--net", "--"]


@lru_cache(maxsize=1)
def can_isolate_network() -> bool:
    """Whether this machine lets us create a network namespace (and drop to a user)."""
    if not shutil.which("unshare") or not shutil.which("setpriv"):
        return False
    try:
        subprocess.run([*_unshare_prefix(), "true"], capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def net_namespace(pid: int | str = "self") -> str | None:
    """The network namespace id of a process (e.g. 'net:[4026531833]')."""
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


# ------------------------------------------------------ process bookkeeping


def _pid_alive(pid: int) -> bool:
    """Alive and not a zombie (orphans may never be reaped in containers)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _process_identity(pid: int) -> str | None:
    """pid plus start time: survives pid reuse checks."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return f"{pid} {fields[19]}"


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            kids.append(int(entry.name))
    return kids


def _pidfile(data_dir: Path) -> tuple[int, str] | None:
    """(pid, status) from postmaster.pid, or None while it is not written."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None
    if not lines or not lines[0].strip().isdigit():
        return None
    status = lines[7].strip() if len(lines) > 7 else ""
    return int(lines[0]), status


_registry: set[LocalInstance] = set()
_registry_lock = threading.RLock()  # re-entrant: signal handlers run on the main thread
_previous_handlers: dict[int, Any] = {}


def _register(instance: LocalInstance) -> None:
    with _registry_lock:
        _registry.add(instance)
    _install_handlers()


def stop_all() -> None:
    """Stop every live instance this process started (atexit and signals)."""
    with _registry_lock:
        live = list(_registry)
    for instance in live:
        with contextlib.suppress(Exception):
            instance.stop()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    stop_all()
    previous = _previous_handlers.get(signum)
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


_atexit_registered = False
_handlers_installed = False


def _install_handlers() -> None:
    """atexit from any thread; signal handlers only from the main thread (Python's rule)."""
    global _atexit_registered, _handlers_installed
    if not _atexit_registered:
        _atexit_registered = True
        atexit.register(stop_all)
    if _handlers_installed or threading.current_thread() is not threading.main_thread():
        return
    _handlers_installed = True
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(signum)
        if previous == signal.SIG_IGN:
            continue  # the process chose to ignore it: so do we
        _previous_handlers[signum] = previous
        signal.signal(signum, _on_signal)


def mark_owner(path: Path) -> None:
    """Record this process (pid and start time) as the creator of a scratch directory."""
    (path / _OWNER_FILE).write_text(_process_identity(os.getpid()) or "")


def _server_runs_in(path: Path) -> bool:
    """A live postmaster in the directory's data dir, or in a scratch instance nested in it."""
    for data in (path / "data", *path.glob(f"{DIR_PREFIX}*/data")):
        info = _pidfile(data)
        if info and _pid_alive(info[0]):
            return True
    return False


def sweep_stale(base_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Delete scratch and drill directories whose creating process died (e.g. SIGKILL)."""
    parent = Path(base_dir or tempfile.gettempdir())
    removed = []
    for path in sorted([*parent.glob(f"{DIR_PREFIX}*"), *parent.glob(f"{DRILL_DIR_PREFIX}*")]):
        try:
            owner = (path / _OWNER_FILE).read_text().strip()
        except OSError:
            continue  # not ours, or its creator has not marked it yet
        pid = int(owner.split()[0]) if owner.split() and owner.split()[0].isdigit() else -1
        if pid > 0 and _process_identity(pid) == owner:
            continue  # its creator still runs
        if _server_runs_in(path):
            continue  # a server still runs there: not ours to kill blindly
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


# ------------------------------------------------------------- local server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _conf_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        value = "on" if value else "off"
    return "'" + str(value).replace("'", "''") + "'"


def _hba(extra: Sequence[str]) -> str:
    lines = ["# written by pgkloset for a scratch instance", *extra,
             "local   all          all                  trust",
             "local   replication  all                  trust",
             "host    all          all   127.0.0.1/32   scram-sha-256",
             "host    replication  all   127.0.0.1/32   scram-sha-256",
             "host    all          all   ::1/128        scram-sha-256",
             "host    replication  all   ::1/128        scram-sha-256"]
    return "\n".join(lines) + "\n"


def _checked(opts: InstanceOptions) -> InstanceOptions:
    """Refuse contradictions before paying for initdb."""
    if opts.isolate_network and opts.tcp:
        raise InstanceError("a network-isolated instance serves only its unix socket; "
                            "do not ask for tcp")
    return opts


class LocalInstance(Instance):
    """A postmaster started by this process, in a directory it owns."""

    def __init__(self, *, binaries: PgBinaries, user: OsUser, base: Path, data_dir: Path,
                 owns_data_dir: bool, superuser: str, password: str | None,
                 stop_mode: StopMode) -> None:
        self.binaries = binaries
        self.user = user
        self.base = base
        self.data_dir = data_dir
        self.socket_dir = base / "sock"
        self.log_file = base / "postgres.log"
        self.host = str(self.socket_dir)
        self.superuser = superuser
        self.password = password
        self.owns_data_dir = owns_data_dir
        self.stop_mode: StopMode = stop_mode
        self.port = 5432
        self.tcp_host = None
        self.isolated = False
        self.process: subprocess.Popen[bytes] | None = None
        self._creator = os.getpid()
        self._stopped = False
        self._lock = threading.RLock()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _launch(self, *, tcp: bool, port: int, isolate: bool, die_with_parent: bool,
                extra_args: Sequence[str], timeout: float) -> None:
        """Start the postmaster as a child of ours and wait until it accepts connections."""
        self.port = port
        self.tcp_host = "127.0.0.1" if tcp else None
        argv = [str(self.binaries.path("postgres")), "-D", str(self.data_dir),
                "-c", f"port={port}", "-c", f"listen_addresses={self.tcp_host or ''}",
                "-c", f"unix_socket_directories={self.socket_dir}", *extra_args]
        prefix: list[str] = []
        setpriv: list[str] = []
        if isolate:
            prefix = _unshare_prefix()
        if not self.user.is_us:
            setpriv += [f"--reuid={self.user.uid}", f"--regid={self.user.gid}", "--clear-groups"]
        if die_with_parent and shutil.which("setpriv"):
            setpriv += ["--pdeathsig", "SIGQUIT"]  # immediate shutdown when we die
        if setpriv or isolate:
            prefix += ["setpriv", *setpriv, "--"]
        with open(self.log_file, "ab") as log:
            # Own session: a terminal's Ctrl-C reaches us, and we stop the server.
            self.process = subprocess.Popen(
                [*prefix, *argv], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                cwd=self.base, env=_server_env(self.base), start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise InstanceError(
                    f"PostgreSQL {self.binaries.version} did not start "
                    f"(exit {self.process.returncode}):\n{self.log_tail()}")
            info = _pidfile(self.data_dir)
            if info and info[0] == self.process.pid and info[1] in ("ready", "standby"):
                break
            if time.monotonic() > deadline:
                self._kill()
                raise InstanceError(
                    f"PostgreSQL did not become ready within {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.02)
        ours = net_namespace()
        theirs = net_namespace(self.process.pid)
        self.isolated = isolate and theirs is not None and theirs != ours

    def stop(self, mode: StopMode | None = None) -> None:
        if os.getpid() != self._creator:
            return  # a forked child must not tear down its parent's server
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        try:
            self._shutdown(mode or self.stop_mode)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
            if self.owns_data_dir:
                shutil.rmtree(self.data_dir, ignore_errors=True)
            with _registry_lock:
                _registry.discard(self)

    def _shutdown(self, mode: StopMode) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.send_signal(_STOP_SIGNALS[mode])
            proc.wait(timeout=60 if mode != "immediate" else 15)
        except subprocess.TimeoutExpired:
            self._kill()

    def _kill(self) -> None:
        """Last resort: SIGKILL the postmaster and any backend it leaves behind."""
        proc = self.process
        if proc is None:
            return
        kids = _children(proc.pid)
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        for kid in kids:
            with contextlib.suppress(OSError):
                if "postgres" in Path(f"/proc/{kid}/cmdline").read_text(errors="replace"):
                    os.kill(kid, signal.SIGKILL)

    def __repr__(self) -> str:
        net = "isolated" if self.isolated else (self.tcp_host or "socket only")
        return f"<LocalInstance PG {self.binaries.version} {self.host}:{self.port} {net}>"


class LocalInstanceProvider(InstanceProvider):
    """Scratch instances from local binaries, run as an unprivileged OS user."""

    def __init__(self, bin_dir: str | os.PathLike[str] | None = None, os_user: str = "postgres",
                 binaries_cache: Path | None = None) -> None:
        self.bin_dir = bin_dir
        self.user = server_user(os_user)
        self.binaries_cache = binaries_cache

    def resolve(self, binaries: PgBinaries | int) -> PgBinaries:
        """Server binaries for a major version, runnable by our OS user."""
        if isinstance(binaries, int):
            binaries = find_binaries(exact_major=binaries, bin_dir=self.bin_dir, tool="postgres")
        return usable_binaries(binaries, self.user, self.binaries_cache)

    def _make_base(self, options: InstanceOptions) -> Path:
        parent = Path(options.base_dir or tempfile.gettempdir())
        base = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=parent))
        mark_owner(base)
        (base / "sock").mkdir(mode=0o700)
        for path in (base, base / "sock"):
            os.chown(path, self.user.uid, self.user.gid)
        if not _traversable_by(base, self.user):
            shutil.rmtree(base, ignore_errors=True)
            raise InstanceError(
                f"OS user {self.user.name} cannot reach {parent}; choose a base_dir it can enter")
        return base

    def _run_owner(self, cmd: Sequence[str], base: Path, what: str) -> None:
        done = subprocess.run(list(cmd), capture_output=True, text=True, cwd=base,
                              env=_server_env(base), timeout=300, **_owner_kwargs(self.user))
        if done.returncode != 0:
            raise InstanceError(f"{what} failed ({done.returncode}): "
                                f"{(done.stderr or done.stdout).strip()}")

    def start(self, binaries: PgBinaries | int, options: InstanceOptions | None = None,
              **overrides: Any) -> LocalInstance:
        opts = _checked(replace(options or InstanceOptions(), **overrides))
        bins = self.resolve(binaries)
        base = self._make_base(opts)
        instance = LocalInstance(
            binaries=bins, user=self.user, base=base, data_dir=base / "data", owns_data_dir=True,
            superuser=opts.superuser, password=opts.password, stop_mode="immediate")
        _register(instance)
        try:
            self._initdb(instance, opts)
            self._launch(instance, opts, extra_args=())
        except BaseException:
            instance.stop()
            raise
        return instance

    def _initdb(self, instance: LocalInstance, opts: InstanceOptions) -> None:
        cmd = [str(instance.binaries.path("initdb")), "-D", str(instance.data_dir),
               "-U", opts.superuser, "-A", "trust", "-E", "UTF8", f"--locale={opts.locale}",
               "--no-sync"]
        if opts.data_checksums:
            cmd.append("--data-checksums")
        if opts.password is not None:
            pwfile = instance.base / "pwfile"
            fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(opts.password + "\n")
            os.chown(pwfile, self.user.uid, self.user.gid)
            cmd.append(f"--pwfile={pwfile}")
        try:
            self._run_owner(cmd, instance.base, "initdb")
        finally:
            (instance.base / "pwfile").unlink(missing_ok=True)
        settings: dict[str, Any] = dict(FAST_SETTINGS)
        if opts.wal_level is not None:
            settings["wal_level"] = opts.wal_level
        if opts.max_wal_senders is not None:
            settings["max_wal_senders"] = opts.max_wal_senders
        settings.update(opts.settings)
        conf = "".join(f"{k} = {_conf_value(v)}\n" for k, v in settings.items())
        with open(instance.data_dir / "postgresql.conf", "a") as f:
            f.write("\n# pgkloset scratch instance\n" + conf)
        (instance.data_dir / "pg_hba.conf").write_text(_hba(opts.hba_lines))

    def _launch(self, instance: LocalInstance, opts: InstanceOptions,
                extra_args: Sequence[str]) -> None:
        isolate = opts.isolate_network and can_isolate_network()
        tcp = not opts.isolate_network if opts.tcp is None else opts.tcp
        die = (threading.current_thread() is threading.main_thread()
               if opts.die_with_parent is None else opts.die_with_parent)
        for attempt in range(5):
            port = opts.port or (_free_port() if tcp else 5432)
            try:
                instance._launch(tcp=tcp, port=port, isolate=isolate, die_with_parent=die,
                                 extra_args=extra_args, timeout=opts.start_timeout)
                return
            except InstanceError:
                raced = "could not bind" in instance.log_tail() or "in use" in instance.log_tail()
                if opts.port or not tcp or not raced or attempt == 4:
                    raise
                instance.log_file.unlink(missing_ok=True)

    def start_existing_data_dir(self, data_dir: str | os.PathLike[str],
                                binaries: PgBinaries | int | None = None,
                                options: InstanceOptions | None = None,
                                **overrides: Any) -> LocalInstance:
        """Start a cluster from a restored data directory (kept on stop).

        Location settings and a trust-on-socket hba file are passed on the
        command line, so the restored postgresql.conf and pg_hba.conf are
        left as they are. The data directory is handed to our OS user.
        """
        opts = _checked(replace(options or InstanceOptions(), **overrides))
        data = Path(data_dir).resolve()
        try:
            data_major = int((data / "PG_VERSION").read_text().strip().split(".")[0])
        except (OSError, ValueError):
            raise InstanceError(f"{data} is not a PostgreSQL data directory "
                                "(no readable PG_VERSION)") from None
        bins = self.resolve(binaries if binaries is not None else data_major)
        if bins.major != data_major:
            raise InstanceError(
                f"{data} holds a PostgreSQL {data_major} cluster, but the binaries are "
                f"{bins.version} ({bins.bin_dir}); a data directory only starts under its "
                "own major version: use a logical snapshot to change versions")
        base = self._make_base(opts)
        instance = LocalInstance(
            binaries=bins, user=self.user, base=base, data_dir=data, owns_data_dir=False,
            superuser=opts.superuser, password=opts.password, stop_mode="fast")
        _register(instance)
        try:
            self._hand_over(data)
            hba = base / "pg_hba.conf"
            hba.write_text(_hba(opts.hba_lines))
            os.chown(hba, self.user.uid, self.user.gid)
            args = ["-c", f"hba_file={hba}"]
            for key, value in opts.settings.items():
                args += ["-c", f"{key}={value}"]
            self._launch(instance, opts, extra_args=args)
        except BaseException:
            instance.stop()
            raise
        return instance

    def _hand_over(self, data: Path) -> None:
        """postgres insists the data dir is owned by it and private."""
        if os.geteuid() == 0:
            for dirpath, dirs, files in os.walk(data):
                for name in [*dirs, *files]:
                    os.lchown(Path(dirpath) / name, self.user.uid, self.user.gid)
            os.chown(data, self.user.uid, self.user.gid)
        data.chmod(0o700)
        if not _traversable_by(data, self.user):
            raise InstanceError(f"OS user {self.user.name} cannot reach {data}")


_default_provider: LocalInstanceProvider | None = None


def start_instance(binaries: PgBinaries | int, **options: Any) -> LocalInstance:
    """Shortcut: a scratch instance from the default local provider."""
    global _default_provider
    if _default_provider is None:
        _default_provider = LocalInstanceProvider()
    return _default_provider.start(binaries, **options)


def start_existing_data_dir(data_dir: str | os.PathLike[str],
                            binaries: PgBinaries | int | None = None,
                            **options: Any) -> LocalInstance:
    """Shortcut: start a restored data directory with the default local provider."""
    global _default_provider
    if _default_provider is None:
        _default_provider = LocalInstanceProvider()
    return _default_provider.start_existing_data_dir(data_dir, binaries, **options)
