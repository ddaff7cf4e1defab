"""The one small interface every storage backend implements.

A backend stores opaque, named objects. Names are relative POSIX-style paths
such as ``config``, ``keys/<id>``, ``data/ab/<id>``. The kloset engine never
assumes more than this interface offers, so retries, caching and fault
injection can be layered as wrappers (as restic does).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
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
