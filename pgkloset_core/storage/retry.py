"""Retry transient storage failures around any backend (restic's RetryBackend).

Backends retry what they can locally (botocore's retry modes, SFTP reconnects)
and raise TransientStorageError only once their own attempts are spent. This
wrapper adds a slower, outer layer so a backup survives a minute-long outage
(an endpoint restarting, a flapping link) instead of failing at the first
error. Permanent failures (not found, exists, access denied) pass through at
once.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from pgkloset_core.storage.base import Backend, ObjectExists, ObjectInfo, StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")


class TransientStorageError(StorageError):
    """A failure that may pass if the same call is repeated (network, throttling, 5xx)."""


def backoff(attempt: int, base: float, cap: float) -> float:
    """Full-jitter exponential delay before retry number ``attempt`` (1-based)."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


def confirm_own_write(backend: Backend, name: str, data: bytes) -> bool:
    """Whether an ambiguous create-only write actually landed.

    When an earlier attempt may have succeeded but its answer was lost, the
    retry sees ObjectExists. The object is ours when it holds exactly our
    bytes (lock files carry unique ids, other objects are content-addressed).
    A transient failure of this check propagates, so the caller retries.
    """
    try:
        return backend.read(name) == data
    except TransientStorageError:
        raise
    except StorageError:
        return False


class RetryingBackend(Backend):
    """Retries TransientStorageError with jittered exponential backoff."""

    def __init__(
        self,
        inner: Backend,
        *,
        attempts: int = 6,
        base_delay: float = 0.5,
        max_delay: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.inner = inner
        self.url = inner.url
        self.attempts = max(1, attempts)
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._sleep = sleep

    def _retry(self, fn: Callable[[], T]) -> T:
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except TransientStorageError as exc:
                if attempt == self.attempts:
                    raise
                delay = backoff(attempt, self.base_delay, self.max_delay)
                log.warning("%s; retrying in %.1fs (%d/%d)", exc, delay, attempt, self.attempts - 1)
                self._sleep(delay)
        raise AssertionError("unreachable")

    def read(self, name: str) -> bytes:
        return self._retry(lambda: self.inner.read(name))

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        return self._retry(lambda: self.inner.read_range(name, offset, length))

    def write(self, name: str, data: bytes, *, overwrite: bool = False) -> None:
        self._write(name, lambda: self.inner.write(name, data, overwrite=overwrite), lambda: data)

    def write_parts(self, name: str, parts: Sequence[bytes], *, overwrite: bool = False) -> None:
        self._write(name, lambda: self.inner.write_parts(name, parts, overwrite=overwrite),
                    lambda: b"".join(parts))

    def _write(self, name: str, send: Callable[[], None], data: Callable[[], bytes]) -> None:
        """``send`` until it lands; ObjectExists after a lost answer may be our own write."""
        failed_before = False

        def attempt() -> None:
            nonlocal failed_before
            try:
                send()
            except ObjectExists:
                if failed_before and confirm_own_write(self.inner, name, data()):
                    return
                raise
            except TransientStorageError:
                failed_before = True
                raise

        self._retry(attempt)

    def delete(self, name: str) -> None:
        self._retry(lambda: self.inner.delete(name))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        # Materialised so a failure halfway is retried from the start without
        # yielding duplicates to the caller.
        return iter(self._retry(lambda: [*self.inner.list(prefix)]))

    def stat(self, name: str) -> ObjectInfo:
        return self._retry(lambda: self.inner.stat(name))

    def exists(self, name: str) -> bool:
        return self._retry(lambda: self.inner.exists(name))

    def close(self) -> None:
        self.inner.close()
