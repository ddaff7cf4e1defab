"""Contract tests every backend must pass, plus S3/SFTP errors and injected faults.

Runs against the filesystem, moto's S3 server and OpenSSH's sshd through
``open_backend(url)``, the same door the kloset uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pgkloset_core.errors import UsageError
from pgkloset_core.storage import (
    Backend,
    ObjectExists,
    ObjectNotFound,
    StorageError,
    open_backend,
)
from pgkloset_core.storage.retry import RetryingBackend, TransientStorageError
from pgkloset_core.storage.s3 import ObjectFrozen, S3Backend
from tests.fixtures.storage import (
    AWS_TEST_ENV,
    CuttingTCPProxy,
    FlakyHTTPProxy,
    SshdServer,
    free_port,
    new_bucket,
    s3_client,
    wait_for_port,
)

MiB = 1024 * 1024


@pytest.fixture
def backend(any_backend_url: str) -> Iterator[Backend]:
    b = open_backend(any_backend_url)
    yield b
    b.close()


def assert_one_line(exc: BaseException, *needles: str, secrets: tuple[str, ...] = ()) -> None:
    msg = str(exc)
    assert msg and "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    for secret in secrets:
        assert secret not in msg, msg


def write_many(b: Backend, objects: dict[str, bytes], threads: int = 8) -> None:
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda kv: b.write(*kv), objects.items()))


# -- contract ------------------------------------------------------------------


def test_write_read_stat(backend: Backend) -> None:
    objects = {"config": b"cfg", "keys/k1": b"key" * 100, "data/ab/abcdef": os.urandom(70_000),
               "empty": b""}
    for name, data in objects.items():
        backend.write(name, data)
    for name, data in objects.items():
        assert backend.read(name) == data
        assert backend.stat(name).size == len(data)
        assert backend.stat(name).name == name
        assert backend.exists(name)


def test_read_range(backend: Backend) -> None:
    data = bytes(range(256)) * 400
    backend.write("data/00/pack", data)
    assert backend.read_range("data/00/pack", 0, 10) == data[:10]
    assert backend.read_range("data/00/pack", 1000, 50_000) == data[1000:51_000]
    assert backend.read_range("data/00/pack", len(data) - 7, 7) == data[-7:]
    assert backend.read_range("data/00/pack", 5, 0) == b""
    with pytest.raises(StorageError) as info:
        backend.read_range("data/00/pack", len(data) - 3, 10)
    assert not isinstance(info.value, ObjectNotFound)


def test_create_only_and_overwrite(backend: Backend) -> None:
    backend.write("locks/a", b"first")
    with pytest.raises(ObjectExists):
        backend.write("locks/a", b"second")
    with pytest.raises(ObjectExists):
        backend.write("locks/a", b"first")
    assert backend.read("locks/a") == b"first"
    backend.write("locks/a", b"third", overwrite=True)
    assert backend.read("locks/a") == b"third"
    backend.write("locks/new", b"x", overwrite=True)
    assert backend.read("locks/new") == b"x"


def test_write_parts_stores_their_concatenation(backend: Backend) -> None:
    """Packs are written from their parts; every backend stores exactly the joined bytes."""
    parts = [b"PGKP", b"", os.urandom(70_000), b"x", os.urandom(300_000)]
    backend.write_parts("data/0a/pack", parts)
    assert backend.read("data/0a/pack") == b"".join(parts)
    assert backend.stat("data/0a/pack").size == sum(map(len, parts))
    with pytest.raises(ObjectExists):
        backend.write_parts("data/0a/pack", [b"other"])
    assert backend.read("data/0a/pack") == b"".join(parts)
    backend.write_parts("data/0a/pack", [b"new", b"er"], overwrite=True)
    assert backend.read("data/0a/pack") == b"newer"
    backend.write_parts("data/0a/none", [])
    assert backend.read("data/0a/none") == b""


def test_fs_writes_leave_the_page_cache_alone(tmp_path: Path) -> None:
    """A written (and fsynced) object's pages are dropped: a backup does not evict the
    database server's working set, and the next pack reuses the freed pages."""
    kind = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True,
                          text=True, check=True).stdout.strip()
    if kind in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is on {kind}: memory is where its files live")
    b = open_backend(str(tmp_path / "k"))
    b.write_parts("data/0b/pack", [os.urandom(MiB) for _ in range(8)])
    b.write("config", os.urandom(MiB))
    for name in ("data/0b/pack", "config"):
        cached = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES",
                                 str(tmp_path / "k" / name)], capture_output=True, text=True,
                                check=True).stdout.strip()
        assert int(cached) < 64 * 1024, (name, cached)


def test_missing_object(backend: Backend) -> None:
    for call in (lambda: backend.read("nope"), lambda: backend.read_range("nope", 0, 1),
                 lambda: backend.stat("index/nope")):
        with pytest.raises(ObjectNotFound) as info:
            call()
        assert_one_line(info.value, "nope")
    assert not backend.exists("nope")
    backend.delete("nope")  # not an error


def test_delete(backend: Backend) -> None:
    backend.write("snapshots/s1", b"1")
    backend.write("snapshots/s2", b"2")
    backend.delete("snapshots/s1")
    assert not backend.exists("snapshots/s1")
    assert [o.name for o in backend.list("snapshots/")] == ["snapshots/s2"]


def test_list_prefixes(backend: Backend) -> None:
    objects = {"index/a": b"1", "index/b": b"22", "data/00/x": b"333", "data/01/y": b"4444",
               "data/010/z": b"5", "snapshots/s": b"6", "indexes": b"7"}
    for name, data in objects.items():
        backend.write(name, data)

    def names(prefix: str) -> dict[str, int]:
        return {o.name: o.size for o in backend.list(prefix)}

    assert names("index/") == {"index/a": 1, "index/b": 2}
    assert names("data/") == {"data/00/x": 3, "data/01/y": 4, "data/010/z": 1}
    assert names("data/01") == {"data/01/y": 4, "data/010/z": 1}
    assert names("data/01/") == {"data/01/y": 4}
    assert names("") == {k: len(v) for k, v in objects.items()}
    assert names("locks/") == {}


def test_list_many(backend: Backend) -> None:
    objects = {f"index/{i:04x}": i.to_bytes(2, "big") for i in range(150)}
    write_many(backend, objects)
    assert {o.name for o in backend.list("index/")} == set(objects)


def test_invalid_names(backend: Backend) -> None:
    for name in ("../escape", "/abs", "a/../../b"):
        with pytest.raises(StorageError):
            backend.write(name, b"x")


def test_retrying_backend_passes_through(any_backend_url: str) -> None:
    b = RetryingBackend(open_backend(any_backend_url))
    b.write("locks/l", b"1")
    with pytest.raises(ObjectExists):
        b.write("locks/l", b"2")
    b.write_parts("data/0c/p", [b"a", b"bc"])
    with pytest.raises(ObjectExists):
        b.write_parts("data/0c/p", [b"a", b"bc"])  # no failure before: not taken for our own
    assert b.read("data/0c/p") == b"abc"
    assert [o.name for o in b.list("locks/")] == ["locks/l"]
    with pytest.raises(ObjectNotFound):
        b.read("missing")
    b.close()


# -- S3 specifics -----------------------------------------------------------------


def test_s3_large_object_is_multipart(s3_url: str, moto_server: str) -> None:
    b = open_backend(s3_url)
    data = os.urandom(40 * MiB)
    b.write("data/ff/bigpack", data)
    assert b.stat("data/ff/bigpack").size == len(data)
    assert b.read("data/ff/bigpack") == data
    assert b.read_range("data/ff/bigpack", 8 * MiB - 10, 20) == data[8 * MiB - 10: 8 * MiB + 10]
    with pytest.raises(ObjectExists):
        b.write("data/ff/bigpack", data)
    bucket = s3_url.split("/")[2]
    etag = s3_client(moto_server).head_object(Bucket=bucket, Key="kloset/data/ff/bigpack")["ETag"]
    assert etag.strip('"').endswith("-5")  # five 8 MiB parts


def test_s3_pagination(s3_url: str) -> None:
    b = open_backend(s3_url)
    objects = {f"data/{i % 7:02x}/{i:06d}": b"" for i in range(1100)}
    write_many(b, objects, threads=16)
    assert {o.name for o in b.list("data/")} == set(objects)
    assert len(list(b.list(""))) == 1100


def test_s3_storage_class_only_for_data(moto_server: str) -> None:
    bucket = new_bucket(moto_server)
    b = open_backend(f"s3://{bucket}?endpoint={moto_server}&storage_class=glacier")
    b.write("config", b"hot")
    b.write("data/aa/pack", b"cold")
    client = s3_client(moto_server)
    assert client.head_object(Bucket=bucket, Key="data/aa/pack")["StorageClass"] == "GLACIER"
    assert client.head_object(Bucket=bucket, Key="config").get("StorageClass", "STANDARD") == "STANDARD"
    assert b.read("config") == b"hot"
    assert b.stat("data/aa/pack").size == 4
    with pytest.raises(ObjectFrozen) as info:
        b.read("data/aa/pack")
    assert_one_line(info.value, "data/aa/pack", "restore")


def test_s3_endpoint_from_environment(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGKLOSET_S3_ENDPOINT", moto_server)
    b = open_backend(f"s3://{new_bucket(moto_server)}/p")
    b.write("config", b"c")
    assert [o.name for o in b.list("")] == ["config"]


def test_s3_missing_bucket(moto_server: str) -> None:
    b = open_backend(f"s3://pgk-no-such-bucket/x?endpoint={moto_server}")
    for call in (lambda: b.read("config"), lambda: b.stat("config"),
                 lambda: b.write("config", b"c"), lambda: list(b.list(""))):
        with pytest.raises(StorageError) as info:
            call()
        assert not isinstance(info.value, ObjectNotFound)
        assert_one_line(info.value, "pgk-no-such-bucket", "does not exist", moto_server)


def test_s3_connection_refused(moto_server: str) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    # The bare backend (open_backend adds a retry layer with backoff on top of it).
    b = S3Backend.from_url(f"s3://pgk-bucket/x?endpoint={endpoint}&max_attempts=2")
    with pytest.raises(TransientStorageError) as info:
        b.read("config")
    assert_one_line(info.value, endpoint, "pgk-bucket", "cannot connect",
                    secrets=(AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"],))


def test_s3_credentials_not_in_url(moto_server: str) -> None:
    with pytest.raises(UsageError) as info:
        open_backend(f"s3://AKIAX:topsecret@bucket/x?endpoint={moto_server}")
    assert_one_line(info.value, secrets=("topsecret",))
    with pytest.raises(UsageError):
        open_backend("s3://bucket/x?endpiont=http://typo")


@pytest.fixture(scope="module")
def moto_auth_server(moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A second moto, in its own process, that checks credentials like AWS does.

    The first six setup requests are let through unauthenticated; every later
    one must be signed. ``kloset`` may use S3, ``nobody`` may not.
    """
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "6"}
    log = open(tmp_path_factory.mktemp("moto-auth") / "log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=log, stderr=log)
    try:
        assert wait_for_port(port, timeout=30, proc=proc), "moto auth server did not start"
        import boto3

        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
        keys = {}
        for user in ("kloset", "nobody"):
            iam.create_user(UserName=user)
            keys[user] = iam.create_access_key(UserName=user)["AccessKey"]
        iam.put_user_policy(UserName="kloset", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        bucket = new_bucket(endpoint)
        yield {"endpoint": endpoint, "bucket": bucket,
               "key_id": keys["kloset"]["AccessKeyId"], "secret": keys["kloset"]["SecretAccessKey"],
               "nobody_key_id": keys["nobody"]["AccessKeyId"],
               "nobody_secret": keys["nobody"]["SecretAccessKey"]}
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.mark.parametrize("wrong", ["secret", "key_id"])
def test_s3_wrong_credentials(moto_auth_server: dict[str, str], wrong: str,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    srv = moto_auth_server
    bad_secret = "WRONG-secret-value-that-must-not-leak"
    key_id = srv["key_id"] if wrong == "secret" else "AKIAUNKNOWNKEY000000"
    secret = bad_secret if wrong == "secret" else srv["secret"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    b = open_backend(f"s3://{srv['bucket']}/x?endpoint={srv['endpoint']}")
    for call in (lambda: b.write("config", b"c"), lambda: b.read("config")):
        with pytest.raises(StorageError) as info:
            call()
        assert_one_line(info.value, "credentials", srv["bucket"], srv["endpoint"],
                        secrets=(secret, srv["secret"], bad_secret))


def test_s3_right_credentials_work(moto_auth_server: dict[str, str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    srv = moto_auth_server
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", srv["key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", srv["secret"])
    b = open_backend(f"s3://{srv['bucket']}/x?endpoint={srv['endpoint']}")
    b.write("config", b"c")
    assert b.read("config") == b"c"


def test_s3_access_denied(moto_auth_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    srv = moto_auth_server
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", srv["nobody_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", srv["nobody_secret"])
    b = open_backend(f"s3://{srv['bucket']}/x?endpoint={srv['endpoint']}")
    with pytest.raises(StorageError) as info:
        b.write("config", b"c")
    assert_one_line(info.value, "access denied", srv["bucket"], srv["endpoint"],
                    secrets=(srv["nobody_secret"],))


def test_s3_survives_flaky_network(moto_server: str) -> None:
    bucket = new_bucket(moto_server)
    upstream = int(moto_server.rsplit(":", 1)[1])
    with FlakyHTTPProxy(upstream, rate=0.1) as proxy:
        b = open_backend(f"s3://{bucket}/k?endpoint=http://127.0.0.1:{proxy.port}")
        objects = {f"data/{i % 4:02x}/{i:04d}": os.urandom(1000 + i * 37) for i in range(80)}
        objects.update({f"locks/{i}": f"lock-{i}".encode() for i in range(20)})
        write_many(b, objects)
        big = os.urandom(20 * MiB)
        b.write("data/ff/big", big)
        with ThreadPoolExecutor(8) as pool:
            got = dict(zip(objects, pool.map(b.read, objects), strict=True))
        assert got == objects
        assert b.read("data/ff/big") == big
        assert {o.name for o in b.list("")} == {*objects, "data/ff/big"}
        assert proxy.failed >= 10, proxy.faults
        assert all(proxy.faults.values()), proxy.faults


def test_retrying_backend_rides_out_failures(moto_server: str) -> None:
    """With botocore's retries off, the outer RetryingBackend alone keeps work going."""
    bucket = new_bucket(moto_server)
    upstream = int(moto_server.rsplit(":", 1)[1])
    with FlakyHTTPProxy(upstream, rate=0.3, seed=11) as proxy:
        raw = open_backend(f"s3://{bucket}?endpoint=http://127.0.0.1:{proxy.port}&max_attempts=1")
        b = RetryingBackend(raw, attempts=12, base_delay=0.01, max_delay=0.05)
        objects = {f"locks/{i:03d}": os.urandom(64) for i in range(40)}
        write_many(b, objects, threads=4)
        packs = {f"data/0d/{i:03d}": [os.urandom(100), os.urandom(2000)] for i in range(20)}
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda kv: b.write_parts(*kv), packs.items()))
        assert {n: b.read(n) for n in objects} == objects
        assert {n: b.read(n) for n in packs} == {n: b"".join(p) for n, p in packs.items()}
        assert {o.name for o in b.list("locks/")} == set(objects)
        assert proxy.faults["503"] > 3, proxy.faults


# -- SFTP specifics ---------------------------------------------------------------


def test_sftp_writes_are_atomic_files(sftp_url: str, sftp_env: SshdServer) -> None:
    b = open_backend(sftp_url)
    b.write("data/ab/cd", b"payload")
    root = Path(sftp_url.split(str(sftp_env.port), 1)[1])
    assert (root / "data/ab/cd").read_bytes() == b"payload"
    assert sorted(p.name for p in (root / "data/ab").iterdir()) == ["cd"]  # no temporaries left
    b.close()


def test_sftp_unknown_host_key(sftp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    monkeypatch.setenv("PGKLOSET_SFTP_KNOWN_HOSTS", str(known))
    with pytest.raises(StorageError) as info:
        open_backend(sftp_url).read("config")
    assert not isinstance(info.value, TransientStorageError)
    assert_one_line(info.value, "unknown SSH host key", "SHA256:", str(known), "TRUST_NEW_HOST")
    assert known.read_text() == ""

    b = open_backend(sftp_url + "?trust_new_host=1")
    b.write("config", b"c")
    assert "ssh-ed25519" in known.read_text()
    assert open_backend(sftp_url).read("config") == b"c"  # now known, no opt-in needed


def test_sftp_changed_host_key(sftp_url: str, sftp_env: SshdServer, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    known = tmp_path / "known_hosts"
    pub = " ".join(Path(f"{other}.pub").read_text().split()[:2])
    known.write_text(f"[127.0.0.1]:{sftp_env.port} {pub}\n")
    monkeypatch.setenv("PGKLOSET_SFTP_KNOWN_HOSTS", str(known))
    monkeypatch.setenv("PGKLOSET_SFTP_TRUST_NEW_HOST", "1")  # must not override a mismatch
    with pytest.raises(StorageError) as info:
        open_backend(sftp_url).read("config")
    assert_one_line(info.value, "does not match", "man-in-the-middle")


def test_sftp_connection_refused(sftp_env: SshdServer) -> None:
    port = free_port()
    with pytest.raises(TransientStorageError) as info:
        open_backend(sftp_env.url("/tmp/x", port=port)).read("config")
    assert_one_line(info.value, f"127.0.0.1:{port}", "connection refused")


def test_sftp_auth_failure(sftp_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    monkeypatch.setenv("PGKLOSET_SFTP_KEY", str(stranger))
    with pytest.raises(StorageError) as info:
        open_backend(sftp_url).read("config")
    assert not isinstance(info.value, TransientStorageError)
    assert_one_line(info.value, "authentication failed", str(stranger))


def test_sftp_password_not_in_url() -> None:
    with pytest.raises(UsageError) as info:
        open_backend("sftp://me:hunter2@example.org/srv")
    assert_one_line(info.value, secrets=("hunter2",))


@pytest.fixture
def cutting_proxy(sftp_env: SshdServer, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[CuttingTCPProxy]:
    with CuttingTCPProxy(sftp_env.port) as proxy:
        known = tmp_path / "known_hosts"
        known.write_text(sftp_env.known_hosts_line(proxy.port))
        monkeypatch.setenv("PGKLOSET_SFTP_KNOWN_HOSTS", str(known))
        yield proxy


def test_sftp_upload_cut_midway_is_resumed(sftp_env: SshdServer, cutting_proxy: CuttingTCPProxy) -> None:
    root = sftp_env.data_root / "cut-upload"
    b = open_backend(sftp_env.url(root, port=cutting_proxy.port))
    b.write("config", b"c")  # connected before the cut
    data = os.urandom(6 * MiB)
    cutting_proxy.arm(2 * MiB)
    b.write("data/aa/pack", data)
    assert cutting_proxy.cuts == 1 and cutting_proxy.connections == 2
    assert b.read("data/aa/pack") == data
    assert {o.name for o in b.list("")} == {"config", "data/aa/pack"}
    assert os.listdir(root / "data/aa") == ["pack"]  # the cut attempt's temporary is gone
    b.close()


def test_sftp_create_only_and_read_cut_midway(sftp_env: SshdServer,
                                              cutting_proxy: CuttingTCPProxy) -> None:
    b = open_backend(sftp_env.url(sftp_env.data_root / "cut-read", port=cutting_proxy.port))
    data = os.urandom(4 * MiB)
    cutting_proxy.arm(1 * MiB)
    b.write("locks/big", data)  # create-only path, cut during the upload
    cutting_proxy.arm(1 * MiB)
    assert b.read("locks/big") == data
    assert cutting_proxy.cuts == 2
    with pytest.raises(ObjectExists):
        b.write("locks/big", b"other")
    b.close()
