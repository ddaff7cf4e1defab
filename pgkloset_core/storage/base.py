"""The one small interface every storage backend implements.

A backend stores opaque, named objects. Names are relative POSIX-style paths
such as ``config``, ``keys/<id>``, ``data/ab/<id>``. The kloset engine never
assumes more than this interface offers, so retries, caching and fault
injection can be layered as wrappers (as restic does).
"""

from __future__ import annotations

import contextlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pgkloset_core.errors import KlosetError


class StorageError(KlosetError):
    """A backend could not do what was asked (I/O error, permission, network)."""


class ObjectNotFound(StorageError):
    """The named object does not exist."""


class ObjectExists(StorageError):
    """A create-only write found the object already there."""


class NoSpace(StorageError):
    """The backend ran out of space."""


class DeleteDenied(StorageError):
    """The backend refused a delete: these credentials may only add (append-only mode)."""


# Cold storage states of one object (see Backend.cold_state).
HOT = "hot"  # readable now
FROZEN = "frozen"  # in an archive class; needs a thaw before reading
THAWING = "thawing"  # a thaw was requested and is still running
THAWED = "thawed"  # a temporary readable copy exists
READABLE = frozenset({HOT, THAWED})

_hints = threading.local()


@contextlib.contextmanager
def metadata_writes() -> Iterator[None]:
    """Objects this thread writes inside the block are metadata: keep them in a hot class.

    Packs of list blobs are named like data packs, yet ``check`` and restore
    planning read them; a backend with a cold storage class for ``data/``
    consults ``writing_metadata()`` so those packs stay readable.
    """
    before = getattr(_hints, "metadata", False)
    _hints.metadata = True
    try:
        yield
    finally:
        _hints.metadata = before


def writing_metadata() -> bool:
    return bool(getattr(_hints, "metadata", False))


REMOTE_READS_IN_FLIGHT = 4  # reads a restore keeps in flight from a store behind a network


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    name: str
    size: int


class Backend(ABC):
    """Named immutable objects. Writes are atomic: readers see all or nothing."""

    url: str

    @abstractmethod
    def read(self, name: str) -> bytes:
        """Return the whole object; raise ObjectNotFound when absent."""

    @abstractmethod
    def read_range(self, name: str, offset: int, length: int) -> bytes:
        """Return ``length`` bytes from ``offset``; raise ObjectNotFound when absent."""

    @abstractmethod
    def write(self, name: str, data: bytes, *, overwrite: bool = False) -> None:
        """Store ``data`` atomically.

        Without ``overwrite`` the write must fail with ObjectExists when the
        object already exists (lock creation relies on this).
        """

    def write_parts(self, name: str, parts: Sequence[bytes], *, overwrite: bool = False) -> None:
        """Store the concatenation of ``parts`` atomically, as ``write`` does.

        Packs are written this way. A backend that can send the parts one
        after another (the filesystem) never joins them: a 32 MiB join is a
        copy into memory fresh from the kernel, page-faulted in for every
        pack. The others join here.
        """
        self.write(name, b"".join(parts), overwrite=overwrite)

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove the object; deleting a missing object is not an error."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose name starts with ``prefix`` (a folder such as ``index/``)."""

    @abstractmethod
    def stat(self, name: str) -> ObjectInfo:
        """Size of one object; raise ObjectNotFound when absent."""

    def exists(self, name: str) -> bool:
        try:
            self.stat(name)
        except ObjectNotFound:
            return False
        return True

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the default has nothing to release."""

    @property
    def reads_in_flight(self) -> int:
        """Reads a restore keeps running at once: enough to hide a remote store's latency.

        Each reader thread also decrypts and decompresses what it fetched;
        a local store, which answers at once, needs no more threads than cores.
        """
        inner = getattr(self, "inner", None)
        return inner.reads_in_flight if isinstance(inner, Backend) else REMOTE_READS_IN_FLIGHT

    # -- cold storage (optional) -------------------------------------------
    # Backends without archive classes keep these defaults: everything is hot.
    # Wrappers that keep the wrapped backend in ``inner`` forward them.

    def cold_state(self, name: str) -> tuple[str, int]:
        """(state, size) of one object: HOT, FROZEN, THAWING or THAWED."""
        inner = getattr(self, "inner", None)
        if isinstance(inner, Backend):
            return inner.cold_state(name)
        return HOT, self.stat(name).size

    def request_thaw(self, name: str, *, days: int | None = None, tier: str | None = None) -> None:
        """Ask for a readable copy of a frozen object for ``days`` (backend defaults if None)."""
        inner = getattr(self, "inner", None)
        if isinstance(inner, Backend):
            inner.request_thaw(name, days=days, tier=tier)

    @property
    def may_be_cold(self) -> bool:
        """Whether objects can sit in an archive class (restores then plan a thaw first)."""
        inner = getattr(self, "inner", None)
        return inner.may_be_cold if isinstance(inner, Backend) else False
