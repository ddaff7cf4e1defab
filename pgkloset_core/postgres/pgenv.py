"""Connection strings, passwords and child processes for the PostgreSQL tools.

A DSN may carry a password. It is split off here, once: the tools get the
rest of the connection string on argv and the password through a private
passfile (PGPASSFILE, mode 0600, deleted afterwards), so it never shows up in
``ps``, in snapshot metadata or in an error message.

`ToolProcess` runs a tool with its stderr read line by line (forwarded to a
log callback; its first error lines and a short tail make the error message)
and kills it when a cancel event is set, so an orchestrator can stop a
running dump.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgkloset_core.errors import KlosetError, UsageError
from pgkloset_core.postgres.names import DSN_ENV

TAIL_LINES = 6
FIRST_ERRORS = 2
LINE_CHARS = 400
# "pg_dump: error: ...", "psql:/f.sql:3: ERROR:  ...", "pg_restore: fatal: ...": the first
# such lines name the cause; what follows may be a long quoted query that pushes them out
# of the tail.
ERROR_LINE = re.compile(r"^[^ ]+: (?:error|fatal|ERROR|FATAL|PANIC):")
Log = Callable[[str], None]


class ToolFailed(KlosetError):
    """A PostgreSQL tool exited non-zero, was killed, or could not start."""


class BackupCancelled(KlosetError):
    """The caller asked to stop; the tool was killed and nothing was committed."""

    exit_code = 130


class ConnectFailed(KlosetError):
    """The server could not be reached, or refused us."""


@dataclass(frozen=True)
class ConnTarget:
    """A parsed DSN: connection parameters without the password, and the password."""

    params: Mapping[str, str]
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, dsn: str | None) -> ConnTarget:
        """A DSN (URI or key=value); None or "" reads PGKLOSET_DSN."""
        text = dsn if dsn else os.environ.get(DSN_ENV, "")
        if not text:
            raise UsageError(f"no connection string: pass --dsn or set {DSN_ENV}")
        try:
            params = {k: str(v) for k, v in conninfo_to_dict(text).items() if v is not None}
        except psycopg.ProgrammingError as exc:
            # The message may quote part of the DSN (a password token): keep only libpq's
            # reason, without any quoted text, on one line.
            reason = re.sub(r'\s*"[^"]*"', "", str(exc).split(":")[0]).strip()
            raise UsageError(f"invalid connection string ({reason})") from None
        if "sslpassword" in params:
            # libpq has no environment variable for it, so it would reach the tools' argv.
            raise UsageError("a DSN with sslpassword is refused: it would be visible in the "
                             "process list; use an unencrypted client key with restricted "
                             "permissions instead")
        password = params.pop("password", None)
        return cls(params=params, password=password)

    @property
    def dbname(self) -> str | None:
        return self.params.get("dbname")

    def with_db(self, dbname: str) -> ConnTarget:
        return ConnTarget({**self.params, "dbname": dbname}, self.password)

    def conninfo(self) -> str:
        """The connection string for argv: never holds the password."""
        return make_conninfo(**self.params)

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """An in-process connection (the password goes to libpq directly, not argv)."""
        extra = {"password": self.password} if self.password is not None else {}
        try:
            return psycopg.connect(self.conninfo(), autocommit=True, **extra, **kwargs)
        except psycopg.OperationalError as exc:
            raise ConnectFailed(
                f"cannot connect to {self.label()} database {self.db_label()}: {_oneline(exc)}"
            ) from None

    def host(self) -> str:
        return self.params.get("host") or self.params.get("hostaddr") or \
            os.environ.get("PGHOST") or "localhost"

    def port(self) -> str:
        return self.params.get("port") or os.environ.get("PGPORT") or "5432"

    def label(self) -> str:
        """host:port, the server's name in metadata when none is configured."""
        return f"{self.host()}:{self.port()}"

    def db_label(self) -> str:
        return repr(self.dbname or self.params.get("user") or os.environ.get("PGDATABASE", ""))


def _oneline(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return "; ".join(lines) or type(exc).__name__


def _passfile_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace(":", "\\:")


@contextlib.contextmanager
def tool_env(target: ConnTarget, base: Mapping[str, str] | None = None) -> Iterator[dict[str, str]]:
    """The environment for a child tool: the password in a private passfile, if any."""
    env = dict(os.environ if base is None else base)
    if target.password is None:
        yield env
        return
    env.pop("PGPASSWORD", None)  # the DSN's password wins over an inherited one
    fd, path = tempfile.mkstemp(prefix="pgkloset-pass-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"*:*:*:*:{_passfile_escape(target.password)}\n")
        env["PGPASSFILE"] = path
        yield env
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


PIPE_SIZE = 1 << 20


def widen_pipe(fd: int, size: int = PIPE_SIZE) -> None:
    """Let a tool run ahead of us by ``size`` bytes (Linux; the default is 64 KiB).

    With 64 KiB pg_dump fills the pipe in a fraction of a millisecond and
    then waits whenever our reading thread waits for the GIL (up to the 5 ms
    switch interval): measured, that alone slowed pg_dump by a third.
    """
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setsize is None:
        return
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, setsize, size)


STDIO_BUFFER = "1M"


@functools.cache
def _working_stdbuf() -> str | None:
    """stdbuf's path, if it runs here (it needs its preload library next to it)."""
    stdbuf = shutil.which("stdbuf")
    if stdbuf is None:
        return None
    try:
        done = subprocess.run([stdbuf, f"--output={STDIO_BUFFER}", f"--input={STDIO_BUFFER}",
                               "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return stdbuf if done.returncode == 0 else None


def stdio_buffered(argv: Sequence[str | os.PathLike[str]], *, stdout: bool = False,
                   stdin: bool = False) -> list[str | os.PathLike[str]]:
    """``argv`` run with 1 MiB stdio buffers (coreutils ``stdbuf``), when stdbuf is here.

    pg_dump writes its archive to stdout through stdio, whose buffer on a pipe
    is 4 KiB: a 2.6 GB dump is 630,000 write calls, and each one can wake our
    reading thread. The two share a core with the server's COPY backend; with
    1 MiB writes the dump costs ~2.5 CPU-s less (docs/BENCHMARKS.md, sixth
    round). Without stdbuf the tool runs as it is: only slower.
    """
    stdbuf = _working_stdbuf() if stdout or stdin else None
    if stdbuf is None:
        return list(argv)
    opts = ([f"--output={STDIO_BUFFER}"] if stdout else []) + \
        ([f"--input={STDIO_BUFFER}"] if stdin else [])
    return [stdbuf, *opts, *argv]


class ToolProcess:
    """A running tool: stderr captured, cancellable, one clear error on failure."""

    def __init__(self, argv: Sequence[str | os.PathLike[str]], env: Mapping[str, str], *,
                 what: str, stdin: int | IO[bytes] | None = subprocess.DEVNULL,
                 stdout: int | IO[bytes] | None = subprocess.DEVNULL,
                 log: Log | None = None, cancel: threading.Event | None = None,
                 cwd: str | None = None) -> None:
        self.what = what
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.first_errors: list[str] = []
        self._lines_read = 0
        self.log = log
        self.cancel = cancel
        self.cancelled = False
        self._done = threading.Event()
        try:
            self.proc = subprocess.Popen(
                [str(a) for a in argv], stdin=stdin, stdout=stdout, stderr=subprocess.PIPE,
                env=dict(env), cwd=cwd, start_new_session=True)
        except OSError as exc:
            raise ToolFailed(f"cannot run {what}: {exc.strerror or exc}") from None
        for pipe in (self.proc.stdout, self.proc.stdin):
            if pipe is not None:
                widen_pipe(pipe.fileno())
        self._reader = threading.Thread(target=self._read_stderr, daemon=True,
                                        name=f"pgkloset-{what}-stderr")
        self._reader.start()
        self._watcher: threading.Thread | None = None
        if cancel is not None:
            self._watcher = threading.Thread(target=self._watch, daemon=True,
                                             name=f"pgkloset-{what}-cancel")
            self._watcher.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stdout(self) -> IO[bytes]:
        assert self.proc.stdout is not None
        return self.proc.stdout

    @property
    def stdin(self) -> IO[bytes]:
        assert self.proc.stdin is not None
        return self.proc.stdin

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if not line:
                continue
            self._lines_read += 1
            if len(self.first_errors) < FIRST_ERRORS and ERROR_LINE.match(line):
                self.first_errors.append(line)
            self.tail.append(line)
            if self.log is not None:
                with contextlib.suppress(Exception):  # a broken logger must not stop the tool
                    self.log(line)

    def _watch(self) -> None:
        assert self.cancel is not None
        while not self._done.is_set():
            if self.cancel.wait(0.2):
                if self.proc.poll() is None:
                    self.cancelled = True
                    self.kill()
                return

    def kill(self) -> None:
        """Kill the tool (and anything it started in its session)."""
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.proc.kill()

    def wait(self) -> int:
        code = self.proc.wait()
        self._done.set()
        self._reader.join(timeout=10)
        return code

    def stderr_lines(self) -> list[str]:
        """The first error lines, then the last lines ("..." where lines were skipped)."""
        tail = list(self.tail)
        head = [line for line in self.first_errors if line not in tail]
        lines = head + (["..."] if head and self._lines_read > len(tail) + len(head) else [])
        lines += tail
        return [line if len(line) <= LINE_CHARS else line[:LINE_CHARS] + "..." for line in lines]

    def stderr_tail(self) -> str:
        return " | ".join(self.stderr_lines())

    def check(self) -> None:
        """Wait; raise BackupCancelled or ToolFailed (first error lines, then the last) on failure."""
        code = self.wait()
        if self.cancelled or (self.cancel is not None and self.cancel.is_set() and code != 0):
            raise BackupCancelled(f"{self.what} cancelled; nothing was committed")
        if code != 0:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            detail = self.stderr_tail() or "no error output"
            raise ToolFailed(f"{self.what} {how}: {detail}")

    def __enter__(self) -> ToolProcess:
        return self

    def __exit__(self, exc_type: object, *_rest: object) -> None:
        if exc_type is not None and self.proc.poll() is None:
            self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if self.proc.poll() is None and exc_type is not None:
            self.proc.wait(timeout=30)
        self._done.set()


def run_tool(argv: Sequence[str | os.PathLike[str]], env: Mapping[str, str], *, what: str,
             log: Log | None = None, cancel: threading.Event | None = None,
             input_path: Path | None = None) -> str:
    """Run a tool to completion; its stdout as text. Raises ToolFailed/BackupCancelled."""
    stdin: Any = subprocess.DEVNULL
    with contextlib.ExitStack() as stack:
        if input_path is not None:
            stdin = stack.enter_context(open(input_path, "rb"))
        with ToolProcess(argv, env, what=what, stdin=stdin, stdout=subprocess.PIPE,
                         log=log, cancel=cancel) as tool:
            out = tool.stdout.read()
            tool.check()
    return out.decode("utf-8", "replace")
