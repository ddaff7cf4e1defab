"""Storage backends behind one small interface (see base.Backend)."""

from __future__ import annotations

from urllib.parse import urlparse

from pgkloset_core.errors import UsageError
from pgkloset_core.storage.base import (
    Backend,
    DeleteDenied,
    NoSpace,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    StorageError,
)

__all__ = [
    "Backend",
    "DeleteDenied",
    "NoSpace",
    "ObjectExists",
    "ObjectInfo",
    "ObjectNotFound",
    "StorageError",
    "open_backend",
]


def open_backend(url: str) -> Backend:
    """Backend for a repository URL: a local path, ``file://``, ``s3://`` or ``sftp://``."""
    if not url:
        raise UsageError("no repository given: use --repo URL or set PGKLOSET_REPO")
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme in ("", "file"):
        from pgkloset_core.storage.fs import FilesystemBackend

        path = parsed.path if scheme == "file" else url
        if scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise UsageError(f"file:// URLs name a local path, not host {parsed.netloc!r}")
        return FilesystemBackend(path)
    if scheme == "s3":
        from pgkloset_core.storage.retry import RetryingBackend
        from pgkloset_core.storage.s3 import S3Backend

        return RetryingBackend(S3Backend.from_url(url))
    if scheme == "sftp":
        from pgkloset_core.storage.retry import RetryingBackend
        from pgkloset_core.storage.sftp import SFTPBackend

        return RetryingBackend(SFTPBackend.from_url(url))
    raise UsageError(f"unsupported repository URL scheme {scheme!r} (use a path, file://, s3:// or sftp://)")
