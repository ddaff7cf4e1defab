"""Local filesystem backend: one file per object, written atomically.

Writes go to a temporary name in the same folder, are fsynced, then renamed
(or hard-linked for create-only writes, which fails if the name exists). A
killed writer leaves only ``.tmp-*`` files, which listings ignore. Written
objects leave the page cache after their fsync (``_drop_from_cache``).
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path

from pgkloset_core.storage.base import (
    REMOTE_READS_IN_FLIGHT,
    Backend,
    NoSpace,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    StorageError,
)

TMP_MARK = ".tmp-"


def _drop_from_cache(fd: int) -> None:
    """Let the kernel drop a written object's pages from its cache (Linux; else nothing).

    After fsync the pages are clean, and a backup reads none of them back: kept,
    they push the database server's working set out of memory. Dropped, they are
    the pages the next pack is written into, which costs far less CPU than
    pages the kernel has not used lately (on VMs that hand free memory back to
    the host, 6 CPU-s per GB against 0.5: docs/BENCHMARKS.md, tenth round).
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    try:
        advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:  # advice only: a filesystem may not take it
        return


class FilesystemBackend(Backend):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.url = f"file://{self.root.resolve() if self.root.exists() else self.root}"

    @property
    def reads_in_flight(self) -> int:
        """No more reader threads than cores: a local read returns at once, so more
        threads only take turns at the GIL (on two cores, four readers made a
        physical restore 10% slower with twice the context switches)."""
        return max(1, min(REMOTE_READS_IN_FLIGHT, os.cpu_count() or 1))

    def _path(self, name: str) -> Path:
        if name.startswith("/") or ".." in name.split("/"):
            raise StorageError(f"invalid object name {name!r}")
        return self.root / name

    def read(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"{name} not found in {self.url}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {name}: {exc.strerror}") from None

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        try:
            with open(self._path(name), "rb") as f:
                f.seek(offset)
                data = f.read(length)
        except FileNotFoundError:
            raise ObjectNotFound(f"{name} not found in {self.url}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {name}: {exc.strerror}") from None
        if len(data) != length:
            raise StorageError(f"{name} is shorter than expected ({offset}+{length})")
        return data

    def write(self, name: str, data: bytes, *, overwrite: bool = False) -> None:
        self.write_parts(name, [data], overwrite=overwrite)

    def write_parts(self, name: str, parts: Sequence[bytes], *, overwrite: bool = False) -> None:
        path = self._path(name)
        tmp = path.with_name(f"{path.name}{TMP_MARK}{secrets.token_hex(6)}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                for part in parts:
                    view = memoryview(part)
                    while view:
                        view = view[os.write(fd, view):]
                os.fsync(fd)
                _drop_from_cache(fd)
            finally:
                os.close(fd)
            if overwrite:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise ObjectExists(f"{name} already exists in {self.url}") from None
                finally:
                    os.unlink(tmp)
            self._fsync_dir(path.parent)
        except StorageError:
            raise
        except OSError as exc:
            _unlink_quietly(tmp)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"no space left writing {name} to {self.url}") from None
            raise StorageError(f"cannot write {name}: {exc.strerror}") from None

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def delete(self, name: str) -> None:
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot delete {name}: {exc.strerror}") from None

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        folder, _, _stem = prefix.rpartition("/")
        base = self.root / folder if folder else self.root
        try:
            if not base.is_dir():
                return
        except OSError as exc:
            raise StorageError(f"cannot list {prefix or '/'}: {exc.strerror}") from None
        # An unreadable folder must not look empty: prune would take its objects for garbage.
        for dirpath, _dirs, files in os.walk(base, onerror=_raise_unless_gone):
            rel_dir = os.path.relpath(dirpath, self.root)
            for fname in files:
                if TMP_MARK in fname:
                    continue
                rel = fname if rel_dir == "." else f"{rel_dir}/{fname}"
                if not rel.startswith(prefix):
                    continue
                try:
                    size = os.stat(os.path.join(dirpath, fname)).st_size
                except FileNotFoundError:
                    continue
                yield ObjectInfo(rel.replace(os.sep, "/"), size)

    def stat(self, name: str) -> ObjectInfo:
        try:
            return ObjectInfo(name, self._path(name).stat().st_size)
        except FileNotFoundError:
            raise ObjectNotFound(f"{name} not found in {self.url}") from None
        except OSError as exc:
            raise StorageError(f"cannot stat {name}: {exc.strerror}") from None

    def leftover_temporaries(self) -> Iterator[Path]:
        """Temporary files of killed writers (prune removes old ones)."""
        for dirpath, _dirs, files in os.walk(self.root):
            for fname in files:
                if TMP_MARK in fname:
                    yield Path(dirpath) / fname


def _raise_unless_gone(exc: OSError) -> None:
    if not isinstance(exc, FileNotFoundError):
        raise StorageError(f"cannot list {exc.filename}: {exc.strerror}")


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
