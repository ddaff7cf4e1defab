"""SFTP backend with paramiko: one file per object under a remote folder.

URL: ``sftp://user@host[:port]/absolute/path`` (``/~/path`` is relative to the
login folder), option ``?trust_new_host=1``. Authentication uses the key in
``PGKLOSET_SFTP_KEY`` (then only that key), else ssh-agent and the default
``~/.ssh`` keys. Host keys are checked strictly against known_hosts
(``PGKLOSET_SFTP_KNOWN_HOSTS``, else ``~/.ssh/known_hosts`` and
``/etc/ssh/ssh_known_hosts``); an unknown host is accepted and recorded only
with ``PGKLOSET_SFTP_TRUST_NEW_HOST=1`` or ``trust_new_host=1``, a changed key
never.

Writes upload to a ``.tmp-*`` name (ignored by listings, like the filesystem
backend), then ``posix-rename`` it over the target, or for create-only writes
hard-link it with ``hardlink@openssh.com``, which fails when the target
exists. Servers without that extension get check-then-rename: two writers
racing for the same new name could then both succeed on a server whose plain
rename overwrites (OpenSSH's does not).

A dropped connection is reopened and the whole operation repeated (an upload
starts again from byte 0 under a fresh temporary name); after a few attempts
TransientStorageError is left to ``RetryingBackend``.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import logging
import os
import secrets
import socket
import stat as stat_mod
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import paramiko
from paramiko.sftp import CMD_EXTENDED

from pgkloset_core.errors import UsageError
from pgkloset_core.storage.base import (
    Backend,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    StorageError,
)
from pgkloset_core.storage.fs import TMP_MARK
from pgkloset_core.storage.retry import TransientStorageError, backoff

log = logging.getLogger(__name__)
T = TypeVar("T")

ATTEMPTS = 4
CONNECT_TIMEOUT = 15.0
IO_TIMEOUT = 60.0
WRITE_CHUNK = 256 * 1024
TRUE_WORDS = ("1", "true", "yes", "on")


class UnknownHostKey(paramiko.SSHException):
    """The server's key is not in known_hosts and trusting new hosts is off."""

    def __init__(self, hostname: str, key: paramiko.PKey) -> None:
        super().__init__(hostname)
        self.hostname = hostname
        self.key = key


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style SHA256 fingerprint, for messages an operator can compare."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return f"{key.get_name()} SHA256:{base64.b64encode(digest).decode().rstrip('=')}"


class _RejectUnknown(paramiko.MissingHostKeyPolicy):
    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise UnknownHostKey(hostname, key)


class _RecordNewHost(paramiko.MissingHostKeyPolicy):
    """Trust on first use: append the key to known_hosts (explicit opt-in only)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.path, "a", encoding="ascii") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.warning("recorded new SSH host key for %s (%s) in %s", hostname, fingerprint(key), self.path)


@dataclass(frozen=True, slots=True)
class SFTPOptions:
    user: str
    host: str
    port: int
    root: str
    trust_new_host: bool = False
    key_file: str | None = None
    known_hosts: str | None = None

    @classmethod
    def parse(cls, url: str) -> SFTPOptions:
        """Options from an ``sftp://`` URL and the PGKLOSET_SFTP_* environment."""
        parts = urlsplit(url)
        if parts.password is not None:
            raise UsageError("do not put a password in the sftp URL: use a key or ssh-agent")
        if not parts.hostname:
            raise UsageError("sftp URL needs a host: sftp://user@host[:port]/path")
        try:
            port = parts.port or 22
        except ValueError:
            raise UsageError("sftp URL has an invalid port") from None
        path = unquote(parts.path)
        if path == "/~" or path.startswith("/~/"):
            root = path[3:].strip("/")
        elif path.strip("/"):
            root = "/" + path.strip("/")
        else:
            raise UsageError("sftp URL needs a folder: sftp://user@host/path (or /~/path)")
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(query) - {"trust_new_host"})
        if unknown:
            raise UsageError(f"unknown sftp URL option {unknown[0]!r} (known: trust_new_host)")
        trust = query.get("trust_new_host", [""])[-1].lower() in TRUE_WORDS
        trust = trust or os.environ.get("PGKLOSET_SFTP_TRUST_NEW_HOST", "").lower() in TRUE_WORDS
        return cls(
            user=unquote(parts.username) if parts.username else getpass.getuser(),
            host=parts.hostname,
            port=port,
            root=root,
            trust_new_host=trust,
            key_file=os.environ.get("PGKLOSET_SFTP_KEY") or None,
            known_hosts=os.environ.get("PGKLOSET_SFTP_KNOWN_HOSTS") or None,
        )


class SFTPBackend(Backend):
    """One SSH connection, used by one thread at a time, reopened when it drops."""

    def __init__(self, opts: SFTPOptions) -> None:
        self.opts = opts
        shown_root = opts.root if opts.root.startswith("/") else f"/~/{opts.root}".rstrip("/")
        self.url = f"sftp://{opts.user}@{opts.host}:{opts.port}{shown_root}"
        self._where = f"{opts.user}@{opts.host}:{opts.port}"
        self._lock = threading.RLock()
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._dirs: set[str] = set()

    @classmethod
    def from_url(cls, url: str) -> SFTPBackend:
        return cls(SFTPOptions.parse(url))

    # -- connection --------------------------------------------------------

    def _known_hosts(self) -> Path:
        return Path(self.opts.known_hosts or Path.home() / ".ssh" / "known_hosts").expanduser()

    def _connect(self) -> paramiko.SFTPClient:
        opts = self.opts
        client = paramiko.SSHClient()
        known = self._known_hosts()
        try:
            if known.exists():
                client.load_host_keys(str(known))
            if not opts.known_hosts and Path("/etc/ssh/ssh_known_hosts").exists():
                client.load_system_host_keys("/etc/ssh/ssh_known_hosts")
        except (OSError, paramiko.SSHException):
            raise StorageError(f"cannot read known_hosts file {known}") from None
        client.set_missing_host_key_policy(_RecordNewHost(known) if opts.trust_new_host else _RejectUnknown())
        key = os.path.expanduser(opts.key_file) if opts.key_file else None
        if key and not os.access(key, os.R_OK):
            raise StorageError(f"SSH key file {key} (PGKLOSET_SFTP_KEY) is missing or unreadable")
        try:
            client.connect(
                opts.host,
                port=opts.port,
                username=opts.user,
                key_filename=key,
                look_for_keys=key is None,
                allow_agent=key is None,
                timeout=CONNECT_TIMEOUT,
                banner_timeout=CONNECT_TIMEOUT,
                auth_timeout=CONNECT_TIMEOUT,
                channel_timeout=CONNECT_TIMEOUT,
            )
            transport = client.get_transport()
            assert transport is not None
            transport.set_keepalive(30)
            sftp = client.open_sftp()
            channel = sftp.get_channel()
            assert channel is not None
            channel.settimeout(IO_TIMEOUT)
        except BaseException as exc:
            client.close()
            if isinstance(exc, Exception):
                raise self._connect_error(exc) from None
            raise
        self._client, self._sftp = client, sftp
        return sftp

    def _connect_error(self, exc: Exception) -> StorageError:
        opts, where = self.opts, self._where
        if isinstance(exc, UnknownHostKey):
            return StorageError(
                f"unknown SSH host key for {exc.hostname} ({fingerprint(exc.key)}), not in "
                f"{self._known_hosts()}: add it (ssh-keyscan) or opt in with PGKLOSET_SFTP_TRUST_NEW_HOST=1"
            )
        if isinstance(exc, paramiko.BadHostKeyException):
            return StorageError(
                f"SSH host key of {opts.host}:{opts.port} does not match known_hosts "
                f"(got {fingerprint(exc.key)}): possible man-in-the-middle; fix known_hosts if the key changed on purpose"
            )
        if isinstance(exc, paramiko.PasswordRequiredException):
            return StorageError(f"SSH key for {where} is passphrase-protected: load it into ssh-agent")
        if isinstance(exc, paramiko.AuthenticationException):
            tried = f"key {opts.key_file}" if opts.key_file else "ssh-agent and ~/.ssh keys"
            return StorageError(f"SSH authentication failed for {where} (tried {tried})")
        if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
            return TransientStorageError(f"cannot connect to sftp {opts.host}:{opts.port}: connection refused")
        if isinstance(exc, socket.gaierror):
            return StorageError(f"cannot resolve sftp host {opts.host!r}")
        if isinstance(exc, TimeoutError | socket.timeout):
            return TransientStorageError(f"cannot connect to sftp {opts.host}:{opts.port}: timed out")
        if isinstance(exc, paramiko.SSHException | EOFError | OSError):
            return TransientStorageError(f"SSH connection to {opts.host}:{opts.port} failed: {_one_line(exc)}")
        return StorageError(f"SSH connection to {opts.host}:{opts.port} failed: {type(exc).__name__}")

    def _session(self) -> paramiko.SFTPClient:
        if self._sftp is not None and self._alive():
            return self._sftp
        self._drop()
        return self._connect()

    def _alive(self) -> bool:
        transport = self._client.get_transport() if self._client else None
        return transport is not None and transport.is_active()

    def _drop(self) -> None:
        client, self._client, self._sftp = self._client, None, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - already broken; nothing to report
                pass

    def _run(self, what: str, name: str, fn: Callable[[paramiko.SFTPClient, int], T]) -> T:
        """Run ``fn(sftp, attempt)``; reconnect and repeat it when the connection fails."""
        last: TransientStorageError | None = None
        for attempt in range(ATTEMPTS):
            if attempt:
                time.sleep(backoff(attempt, 0.2, 2.0))
            with self._lock:
                try:
                    return fn(self._session(), attempt)
                except TransientStorageError as exc:
                    last = exc
                    self._drop()
                except (paramiko.SSHException, EOFError, OSError) as exc:
                    if not self._is_connection_error(exc):
                        raise StorageError(f"sftp {what} {name} failed on {self._where}: {_one_line(exc)}") from None
                    last = TransientStorageError(f"SSH connection to {self._where} lost during {what} {name}")
                    log.debug("%s; reconnecting", last)
                    self._drop()
        assert last is not None
        raise last

    def _is_connection_error(self, exc: BaseException) -> bool:
        if isinstance(exc, paramiko.SSHException | EOFError | TimeoutError | socket.timeout | ConnectionError):
            return True
        return not self._alive()

    # -- paths -------------------------------------------------------------

    def _path(self, name: str) -> str:
        if not name or name.startswith("/") or ".." in name.split("/"):
            raise StorageError(f"invalid object name {name!r}")
        return f"{self.opts.root}/{name}" if self.opts.root else name

    def _folder(self, rel: str) -> str:
        if not rel:
            return self.opts.root or "."
        return f"{self.opts.root}/{rel}" if self.opts.root else rel

    def _makedirs(self, sftp: paramiko.SFTPClient, path: str) -> None:
        """mkdir -p that tolerates other writers creating the same folders."""
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if not sub or sub in self._dirs:
                continue
            try:
                sftp.mkdir(sub, 0o700)
            except OSError:
                if not self._alive():
                    raise
                try:
                    is_dir = stat_mod.S_ISDIR(sftp.stat(sub).st_mode or 0)
                except FileNotFoundError:
                    is_dir = False
                if not is_dir:
                    raise StorageError(f"cannot create folder {sub} on {self._where}") from None
            self._dirs.add(sub)

    # -- Backend -----------------------------------------------------------

    def read(self, name: str) -> bytes:
        path = self._path(name)

        def read(sftp: paramiko.SFTPClient, _attempt: int) -> bytes:
            with _open(sftp, path, "rb", name, self.url) as f:
                size = f.stat().st_size or 0
                f.prefetch(size)
                data = f.read(size)
            if len(data) != size:
                raise TransientStorageError(f"short read of {name} from {self._where}")
            return data

        return self._run("read", name, read)

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        path = self._path(name)

        def read(sftp: paramiko.SFTPClient, _attempt: int) -> bytes:
            with _open(sftp, path, "rb", name, self.url) as f:
                if offset + length > (f.stat().st_size or 0):
                    raise StorageError(f"{name} is shorter than expected ({offset}+{length})")
                if length <= 0:
                    return b""
                return b"".join(f.readv([(offset, length)]))

        return self._run("read", name, read)

    def write(self, name: str, data: bytes, *, overwrite: bool = False) -> None:
        path = self._path(name)
        folder, _, base = path.rpartition("/")
        stale: list[str] = []

        def write(sftp: paramiko.SFTPClient, attempt: int) -> None:
            for old in stale:  # partial uploads of attempts cut short
                _remove_quietly(sftp, old)
            tmp = f"{folder}/{base}{TMP_MARK}{secrets.token_hex(6)}" if folder else f"{base}{TMP_MARK}{secrets.token_hex(6)}"
            stale[:] = [tmp]
            self._upload(sftp, tmp, folder, data)
            try:
                if overwrite:
                    sftp.posix_rename(tmp, path)
                else:
                    self._link_exclusive(sftp, tmp, path, name, data, attempt)
                    _remove_quietly(sftp, tmp)
            except BaseException:
                if self._alive():
                    _remove_quietly(sftp, tmp)
                raise
            stale.clear()

        self._run("write", name, write)

    def _upload(self, sftp: paramiko.SFTPClient, tmp: str, folder: str, data: bytes) -> None:
        try:
            f = sftp.open(tmp, "wxb")
        except FileNotFoundError:
            self._makedirs(sftp, folder)
            f = sftp.open(tmp, "wxb")
        with f:
            f.set_pipelined(True)
            view = memoryview(data)
            for start in range(0, len(data), WRITE_CHUNK):
                f.write(view[start:start + WRITE_CHUNK])
            f.flush()
            try:
                _extended(sftp, "fsync@openssh.com", f.handle)
            except OSError:
                pass  # server without fsync: durability is then the server's default
        size = sftp.stat(tmp).st_size
        if size != len(data):
            raise TransientStorageError(f"upload of {tmp} to {self._where} is incomplete")

    def _link_exclusive(
        self, sftp: paramiko.SFTPClient, tmp: str, path: str, name: str, data: bytes, attempt: int
    ) -> None:
        try:
            _extended(sftp, "hardlink@openssh.com", tmp, path)
            return
        except OSError as exc:
            unsupported = "unsupported" in str(exc).lower()
            if not unsupported and not self._alive():
                raise
        if _exists(sftp, path):
            self._existing(sftp, name, path, data, attempt)
            return
        if not unsupported:
            raise StorageError(f"cannot create {name} on {self._where}")
        # Check-then-rename: racy on servers whose rename overwrites (see module doc).
        sftp.rename(tmp, path)

    def _existing(self, sftp: paramiko.SFTPClient, name: str, path: str, data: bytes, attempt: int) -> None:
        """Raise ObjectExists, unless a retried write finds its own earlier attempt in place."""
        if attempt and _read_all(sftp, path) == data:
            return
        raise ObjectExists(f"{name} already exists in {self.url}")

    def delete(self, name: str) -> None:
        path = self._path(name)

        def delete(sftp: paramiko.SFTPClient, _attempt: int) -> None:
            try:
                sftp.remove(path)
            except FileNotFoundError:
                pass

        self._run("delete", name, delete)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        start = prefix.rpartition("/")[0]

        def walk(sftp: paramiko.SFTPClient, _attempt: int) -> list[ObjectInfo]:
            found: list[ObjectInfo] = []
            pending = [start]
            while pending:
                rel = pending.pop()
                try:
                    entries = sftp.listdir_attr(self._folder(rel))
                except FileNotFoundError:
                    continue
                for entry in entries:
                    child = f"{rel}/{entry.filename}" if rel else entry.filename
                    if stat_mod.S_ISDIR(entry.st_mode or 0):
                        if child.startswith(prefix) or prefix.startswith(child + "/"):
                            pending.append(child)
                    elif (
                        stat_mod.S_ISREG(entry.st_mode or 0)
                        and TMP_MARK not in entry.filename
                        and child.startswith(prefix)
                    ):
                        found.append(ObjectInfo(child, entry.st_size or 0))
            return found

        yield from self._run("list", prefix or "/", walk)

    def stat(self, name: str) -> ObjectInfo:
        path = self._path(name)

        def stat(sftp: paramiko.SFTPClient, _attempt: int) -> ObjectInfo:
            try:
                st = sftp.stat(path)
            except FileNotFoundError:
                raise ObjectNotFound(f"{name} not found in {self.url}") from None
            return ObjectInfo(name, st.st_size or 0)

        return self._run("stat", name, stat)

    def close(self) -> None:
        with self._lock:
            self._drop()


def _open(sftp: paramiko.SFTPClient, path: str, mode: str, name: str, url: str) -> Any:
    try:
        return sftp.open(path, mode)
    except FileNotFoundError:
        raise ObjectNotFound(f"{name} not found in {url}") from None


def _read_all(sftp: paramiko.SFTPClient, path: str) -> bytes:
    with sftp.open(path, "rb") as f:
        f.prefetch()
        return f.read()


def _exists(sftp: paramiko.SFTPClient, path: str) -> bool:
    try:
        sftp.stat(path)
    except FileNotFoundError:
        return False
    return True


def _extended(sftp: paramiko.SFTPClient, request: str, *args: Any) -> None:
    # paramiko has no public call for OpenSSH's extensions (hardlink, fsync);
    # _request is the same call its own posix_rename uses.
    sftp._request(CMD_EXTENDED, request, *args)


def _remove_quietly(sftp: paramiko.SFTPClient, path: str) -> None:
    try:
        sftp.remove(path)
    except OSError:
        log.debug("could not remove temporary %s", path)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
