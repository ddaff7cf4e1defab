"""Errors that the CLI turns into one clear line on stderr and a non-zero exit.

Every expected failure raises a KlosetError (or a subclass); anything else is
a bug and is allowed to show a traceback.
"""

from __future__ import annotations


class KlosetError(Exception):
    """Base of every expected, user-facing failure."""

    exit_code = 1


class NotAKloset(KlosetError):
    """The repository location holds no kloset."""


class WrongPassphrase(KlosetError):
    """No key file opens with the given passphrase."""


class UnsupportedFormat(KlosetError):
    """The kloset was written by a newer (or unknown) format version."""


class CorruptObject(KlosetError):
    """An object failed authentication, hashing or decoding."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.object_name = name
        self.reason = reason


class SnapshotNotFound(KlosetError):
    """No snapshot matches the given id, prefix or name."""


class AmbiguousSnapshot(KlosetError):
    """A snapshot id prefix matches more than one snapshot."""


class EntryNotFound(KlosetError):
    """The snapshot has no entry of that name."""


class LockError(KlosetError):
    """The kloset is locked by someone else, or our lock was lost."""


class UsageError(KlosetError):
    """The command's arguments or input do not make sense."""

    exit_code = 2
