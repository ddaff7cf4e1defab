"""S3 backend with plain boto3, so it works unchanged on AWS, MinIO and others.

URL: ``s3://bucket[/prefix]?endpoint=URL&region=R&storage_class=C
&addressing_style=path|virtual|auto&max_attempts=N&thaw_days=D&thaw_tier=T
&object_lock_days=N&object_lock_mode=governance|compliance``. The endpoint may also
come from ``PGKLOSET_S3_ENDPOINT`` (or boto3's own ``AWS_ENDPOINT_URL_S3``);
credentials and region come from the standard AWS chain, never from the URL.

Create-only writes use ``If-None-Match: *`` (on PutObject and on
CompleteMultipartUpload), which S3 and MinIO evaluate atomically, so lock
creation is safe between hosts. The storage class applies to ``data/`` only:
metadata (config, keys, locks, index, snapshots, and packs of list blobs,
written under ``metadata_writes()``) stays in a hot class. A frozen object
(GLACIER, DEEP_ARCHIVE, or an Intelligent-Tiering archive tier) is thawed
with RestoreObject (``thaw_days``, default 7; ``thaw_tier`` Standard, Bulk or
Expedited); ``cold_state`` reads HeadObject's Restore header.

Append-only: a DeleteObject refused with AccessDenied becomes DeleteDenied.
With ``object_lock_days`` every pack, index delta and snapshot is written
with Object Lock retention (GOVERNANCE unless ``object_lock_mode=compliance``;
the bucket must have Object Lock enabled).

Retries: botocore's retry mode (``standard`` unless ``AWS_RETRY_MODE`` says
otherwise) handles throttling, 5xx and connection setup; this module adds a
retry around failures botocore cannot see (a connection cut while a response
body streams in). Once those are spent it raises TransientStorageError for
``RetryingBackend`` to retry more slowly.
"""

from __future__ import annotations

import http.client
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import boto3
import urllib3.exceptions
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ProxyConnectionError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from pgkloset_core.errors import UsageError
from pgkloset_core.storage.base import (
    FROZEN,
    HOT,
    THAWED,
    THAWING,
    Backend,
    DeleteDenied,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    StorageError,
    writing_metadata,
)
from pgkloset_core.storage.retry import TransientStorageError, backoff

log = logging.getLogger(__name__)
T = TypeVar("T")

DATA_PREFIX = "data/"
MULTIPART_THRESHOLD = 16 * 1024 * 1024
PART_SIZE = 8 * 1024 * 1024
UPLOAD_THREADS = 4
STREAM_ATTEMPTS = 4
URL_OPTIONS = ("endpoint", "region", "storage_class", "addressing_style", "max_attempts",
               "thaw_days", "thaw_tier", "object_lock_days", "object_lock_mode")
ARCHIVE_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})
THAW_TIERS = ("Standard", "Bulk", "Expedited")
DEFAULT_THAW_DAYS = 7
LOCKED_PREFIXES = ("data/", "index/", "snapshots/")
APPEND_ONLY = ("the kloset is append-only for these credentials; run forget/prune with "
               "maintenance credentials")
STORAGE_CLASSES = frozenset(
    {"STANDARD", "REDUCED_REDUNDANCY", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING",
     "GLACIER", "GLACIER_IR", "DEEP_ARCHIVE", "OUTPOSTS", "SNOW", "EXPRESS_ONEZONE"}
)
# Failures after botocore returned a response: it does not retry these itself.
DROPPED = (
    ConnectionClosedError,
    ReadTimeoutError,
    ResponseStreamingError,
    IncompleteReadError,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    ConnectionError,
)
CONNECT_FAILED = (EndpointConnectionError, ConnectTimeoutError, ProxyConnectionError)
NO_CREDENTIALS = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)
BAD_CREDENTIALS = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
     "InvalidClientTokenId", "AuthorizationHeaderMalformed", "TokenRefreshRequired"}
)
THROTTLED = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
     "RequestLimitExceeded", "TooManyRequestsException", "ServiceUnavailable"}
)


class ObjectFrozen(StorageError):
    """The object sits in a cold storage class and must be restored before reading."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{name} is in cold storage (GLACIER/DEEP_ARCHIVE): restore it before reading")
        self.object_name = name


@dataclass(frozen=True, slots=True)
class S3Options:
    bucket: str
    prefix: str = ""
    endpoint: str | None = None
    region: str | None = None
    storage_class: str | None = None
    addressing_style: str | None = None
    max_attempts: int | None = None
    thaw_days: int = DEFAULT_THAW_DAYS
    thaw_tier: str = "Standard"
    object_lock_days: int | None = None
    object_lock_mode: str = "GOVERNANCE"

    @classmethod
    def parse(cls, url: str) -> S3Options:
        """Options from an ``s3://`` URL; credentials in it are refused, not echoed."""
        parts = urlsplit(url)
        if "@" in parts.netloc:
            raise UsageError("S3 credentials do not belong in the repository URL: use the AWS environment or a profile")
        if not parts.netloc:
            raise UsageError("S3 URL needs a bucket: s3://bucket/prefix")
        query = parse_qs(parts.query, keep_blank_values=True)
        unknown = sorted(set(query) - set(URL_OPTIONS))
        if unknown:
            raise UsageError(f"unknown S3 URL option {unknown[0]!r} (known: {', '.join(URL_OPTIONS)})")
        opt = {k: v[-1] for k, v in query.items() if v and v[-1]}
        storage_class = opt.get("storage_class", "").upper() or None
        if storage_class and storage_class not in STORAGE_CLASSES:
            raise UsageError(f"unknown S3 storage class {storage_class!r}")
        style = opt.get("addressing_style")
        if style not in (None, "path", "virtual", "auto"):
            raise UsageError("addressing_style must be path, virtual or auto")
        attempts = opt.get("max_attempts")
        if attempts is not None and not attempts.isdigit():
            raise UsageError("max_attempts must be a positive integer")
        for key in ("thaw_days", "object_lock_days"):
            if key in opt and not (opt[key].isdigit() and int(opt[key]) > 0):
                raise UsageError(f"{key} must be a positive number of days")
        tier = {t.lower(): t for t in THAW_TIERS}.get(opt.get("thaw_tier", "standard").lower())
        if tier is None:
            raise UsageError(f"thaw_tier must be one of {', '.join(THAW_TIERS)}")
        lock_mode = opt.get("object_lock_mode", "governance").upper()
        if lock_mode not in ("GOVERNANCE", "COMPLIANCE"):
            raise UsageError("object_lock_mode must be governance or compliance")
        return cls(
            bucket=parts.netloc,
            prefix=parts.path.strip("/"),
            endpoint=opt.get("endpoint") or os.environ.get("PGKLOSET_S3_ENDPOINT") or None,
            region=opt.get("region"),
            storage_class=storage_class,
            addressing_style=style,
            max_attempts=int(attempts) if attempts else None,
            thaw_days=int(opt.get("thaw_days", DEFAULT_THAW_DAYS)),
            thaw_tier=tier,
            object_lock_days=int(opt["object_lock_days"]) if "object_lock_days" in opt else None,
            object_lock_mode=lock_mode,
        )


def _make_client(opts: S3Options) -> Any:
    session = boto3.session.Session(region_name=opts.region)
    region = opts.region or session.region_name or os.environ.get("AWS_REGION") or "us-east-1"
    env_attempts = os.environ.get("AWS_MAX_ATTEMPTS", "")
    attempts = opts.max_attempts or (int(env_attempts) if env_attempts.isdigit() else 6)
    # MinIO and most self-hosted endpoints want path-style addressing.
    style = opts.addressing_style or ("path" if opts.endpoint else "auto")
    config = Config(
        region_name=region,
        retries={"mode": os.environ.get("AWS_RETRY_MODE") or "standard", "total_max_attempts": attempts},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=4 * UPLOAD_THREADS,
        s3={"addressing_style": style},
        user_agent_appid="pgkloset",
    )
    return session.client("s3", endpoint_url=opts.endpoint, config=config)


class S3Backend(Backend):
    """Objects under ``prefix/`` in one bucket."""

    def __init__(self, opts: S3Options, client: Any | None = None) -> None:
        self.opts = opts
        self.url = f"s3://{opts.bucket}/{opts.prefix}".rstrip("/")
        self._where = f"bucket {opts.bucket!r} at {_display_endpoint(opts.endpoint)}"
        self._client = client if client is not None else _make_client(opts)
        self._bucket_checked = False

    @classmethod
    def from_url(cls, url: str) -> S3Backend:
        return cls(S3Options.parse(url))

    # -- helpers -----------------------------------------------------------

    def _key(self, name: str) -> str:
        if not name or name.startswith("/") or ".." in name.split("/"):
            raise StorageError(f"invalid object name {name!r}")
        return f"{self.opts.prefix}/{name}" if self.opts.prefix else name

    def _call(self, what: str, name: str, fn: Callable[[], T]) -> T:
        """Run one S3 request, retrying dropped connections, mapping errors to one line."""
        for attempt in range(1, STREAM_ATTEMPTS + 1):
            try:
                return fn()
            except DROPPED as exc:
                if attempt == STREAM_ATTEMPTS:
                    raise self._translate(exc, what, name) from None
                log.debug("S3 %s %s: connection dropped (%s), retrying", what, name, type(exc).__name__)
                time.sleep(backoff(attempt, 0.2, 2.0))
            except (ClientError, BotoCoreError) as exc:
                raise self._translate(exc, what, name) from None
        raise AssertionError("unreachable")

    def _translate(self, exc: Exception, what: str, name: str) -> StorageError:
        """One secret-free line: never the service's message text, which may echo request data."""
        where = self._where
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in ("NoSuchKey", "NotFound", "404"):
                return ObjectNotFound(f"{name} not found in {self.url}")
            if code == "NoSuchBucket":
                return StorageError(f"S3 {where} does not exist")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
                return ObjectExists(f"{name} already exists in {self.url}")
            if code == "InvalidObjectState":
                return ObjectFrozen(name)
            if code in BAD_CREDENTIALS:
                return StorageError(f"S3 rejected the credentials ({code}) for {where}: check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or the AWS profile")
            if code in ("AccessDenied", "AllAccessDisabled", "403") or status == 403:
                if what == "delete":
                    return DeleteDenied(f"{APPEND_ONLY} (S3 denied deleting {name} in {where})")
                return StorageError(f"S3 access denied for {what} {name} in {where}: check the credentials' permissions")
            if code == "InvalidRange" or status == 416:
                return StorageError(f"{name} is shorter than the requested range")
            if code in THROTTLED or status >= 500:
                return TransientStorageError(f"S3 {what} {name} failed in {where}: {code or status} (after retries)")
            return StorageError(f"S3 {what} {name} failed in {where}: {code or status}")
        if isinstance(exc, NO_CREDENTIALS):
            return StorageError(f"no usable S3 credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
        if isinstance(exc, CONNECT_FAILED):
            return TransientStorageError(f"cannot connect to S3 endpoint {_display_endpoint(self.opts.endpoint)} (connection refused, unreachable or timed out) for bucket {self.opts.bucket!r}")
        if isinstance(exc, DROPPED):
            return TransientStorageError(f"connection to S3 {where} dropped during {what} {name}")
        return StorageError(f"S3 {what} {name} failed in {where}: {type(exc).__name__}")

    def _extra_args(self, name: str) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.opts.storage_class and name.startswith(DATA_PREFIX) and not writing_metadata():
            extra["StorageClass"] = self.opts.storage_class
        if self.opts.object_lock_days and name.startswith(LOCKED_PREFIXES):
            extra["ObjectLockMode"] = self.opts.object_lock_mode
            extra["ObjectLockRetainUntilDate"] = (
                datetime.now(UTC) + timedelta(days=self.opts.object_lock_days))
        return extra

    def _check_bucket(self) -> None:
        """Tell a missing bucket from a missing object (HEAD gives both as a bare 404)."""
        if self._bucket_checked:
            return
        try:
            self._call("check", "bucket", lambda: self._client.head_bucket(Bucket=self.opts.bucket))
        except ObjectNotFound:
            raise StorageError(f"S3 {self._where} does not exist") from None
        except TransientStorageError:
            return  # ask again next time
        except StorageError:
            pass  # e.g. no s3:ListBucket permission: the object answer stands
        self._bucket_checked = True

    # -- Backend -----------------------------------------------------------

    def read(self, name: str) -> bytes:
        key = self._key(name)

        def get() -> bytes:
            resp = self._client.get_object(Bucket=self.opts.bucket, Key=key)
            with resp["Body"] as body:
                data = body.read()
            if len(data) != resp["ContentLength"]:
                raise IncompleteReadError(actual_bytes=len(data), expected_bytes=resp["ContentLength"])
            return data

        return self._call("read", name, get)

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        key = self._key(name)
        if length <= 0:
            self.stat(name)
            return b""

        def get() -> bytes:
            resp = self._client.get_object(
                Bucket=self.opts.bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}"
            )
            with resp["Body"] as body:
                return body.read()

        data = self._call("read", name, get)
        if len(data) != length:
            raise StorageError(f"{name} is shorter than expected ({offset}+{length})")
        return data

    def write(self, name: str, data: bytes, *, overwrite: bool = False) -> None:
        key = self._key(name)
        extra = self._extra_args(name)
        cond = {} if overwrite else {"IfNoneMatch": "*"}
        sends = _SendCounter()
        try:
            if len(data) > MULTIPART_THRESHOLD:
                if cond and self.exists(name):
                    raise ObjectExists(f"{name} already exists in {self.url}")
                self._write_multipart(key, name, data, extra, cond, sends)
            else:
                self._call("write", name, sends.wrap(lambda: self._client.put_object(
                    Bucket=self.opts.bucket, Key=key, Body=data, **cond, **extra)))
        except StorageError:
            # A retried request may trip over its own earlier attempt whose
            # answer was lost (412, or NoSuchUpload for a completed upload):
            # then the object already holds exactly our bytes.
            if sends.count > 1 and self._holds(name, data):
                return
            raise

    def _holds(self, name: str, data: bytes) -> bool:
        """Whether the object holds exactly ``data``; transient failures propagate."""
        try:
            return self.read(name) == data
        except TransientStorageError:
            raise
        except StorageError:
            return False

    def _write_multipart(
        self,
        key: str,
        name: str,
        data: bytes,
        extra: dict[str, Any],
        cond: dict[str, str],
        sends: _SendCounter,
    ) -> None:
        bucket = self.opts.bucket
        created = self._call("write", name, lambda: self._client.create_multipart_upload(
            Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32", **extra))
        upload_id = created["UploadId"]

        def upload(number: int) -> dict[str, Any]:
            start = (number - 1) * PART_SIZE
            chunk = data[start:start + PART_SIZE]
            resp = self._call("write", name, lambda: self._client.upload_part(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk,
                ChecksumAlgorithm="CRC32"))
            part = {"ETag": resp["ETag"], "PartNumber": number}
            if resp.get("ChecksumCRC32"):
                part["ChecksumCRC32"] = resp["ChecksumCRC32"]
            return part

        count = -(-len(data) // PART_SIZE)
        try:
            with ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="s3-part") as pool:
                parts = list(pool.map(upload, range(1, count + 1)))
            self._call("write", name, sends.wrap(lambda: self._client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}, **cond)))
        except BaseException:
            try:
                self._client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            except (ClientError, BotoCoreError):
                log.debug("could not abort multipart upload of %s", name)
            raise

    def delete(self, name: str) -> None:
        key = self._key(name)
        self._call("delete", name, lambda: self._client.delete_object(Bucket=self.opts.bucket, Key=key))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        # Pages are fetched one by one (not with boto3's paginator) so each
        # page request is retried on its own.
        base = f"{self.opts.prefix}/" if self.opts.prefix else ""
        args: dict[str, Any] = {"Bucket": self.opts.bucket, "Prefix": base + prefix}
        while True:
            page = self._call("list", prefix or "/", lambda a=dict(args): self._client.list_objects_v2(**a))
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if not key.endswith("/"):
                    yield ObjectInfo(key[len(base):], int(obj["Size"]))
            if not page.get("IsTruncated"):
                return
            args["ContinuationToken"] = page["NextContinuationToken"]

    def _head(self, name: str) -> dict[str, Any]:
        """HEAD of one object; a missing bucket is told apart from a missing object."""
        key = self._key(name)
        try:
            return self._call("stat", name, lambda: self._client.head_object(Bucket=self.opts.bucket, Key=key))
        except ObjectNotFound:
            self._check_bucket()
            raise

    def stat(self, name: str) -> ObjectInfo:
        return ObjectInfo(name, int(self._head(name)["ContentLength"]))

    # -- cold storage --------------------------------------------------------

    @property
    def may_be_cold(self) -> bool:
        # Lifecycle rules may move objects to an archive class whatever the URL says.
        return True

    def cold_state(self, name: str) -> tuple[str, int]:
        resp = self._head(name)
        size = int(resp["ContentLength"])
        archived = resp.get("StorageClass") in ARCHIVE_CLASSES or bool(resp.get("ArchiveStatus"))
        if not archived:
            return HOT, size
        restore = resp.get("Restore") or ""
        if 'ongoing-request="true"' in restore:
            return THAWING, size
        if 'ongoing-request="false"' in restore:
            return THAWED, size
        return FROZEN, size

    def request_thaw(self, name: str, *, days: int | None = None, tier: str | None = None) -> None:
        key = self._key(name)
        request: dict[str, Any] = {"GlacierJobParameters": {"Tier": tier or self.opts.thaw_tier}}
        request["Days"] = days or self.opts.thaw_days

        def restore() -> None:
            try:
                self._client.restore_object(Bucket=self.opts.bucket, Key=key, RestoreRequest=request)
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code == "RestoreAlreadyInProgress":
                    return
                if code == "InvalidObjectState":
                    return  # not (or no longer) in an archive class: nothing to thaw
                raise

        self._call("thaw", name, restore)

    def close(self) -> None:
        self._client.close()


class _SendCounter:
    """Counts how often a conditional request was sent, botocore's retries included."""

    def __init__(self) -> None:
        self.count = 0

    def wrap(self, fn: Callable[[], T]) -> Callable[[], T]:
        def call() -> T:
            self.count += 1
            try:
                return fn()
            except ClientError as exc:
                self.count += int(exc.response.get("ResponseMetadata", {}).get("RetryAttempts") or 0)
                raise

        return call


def _display_endpoint(endpoint: str | None) -> str:
    """Endpoint for messages, without any user:password part."""
    if not endpoint:
        return "AWS S3"
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}" if parts.scheme else endpoint
