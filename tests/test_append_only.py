"""Append-only klosets on S3: backup credentials that may not delete (an IAM policy that
moto's server enforces) can back up but not forget or prune; maintenance credentials can.
Object Lock retention protects packs and snapshots even from the maintenance role."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.storage import free_port, wait_for_port

PASSPHRASE = "append-only test passphrase"
CLI = [sys.executable, "-m", "pgkloset_core.cli"]
ROOT = Path(__file__).resolve().parents[1]
APPEND_ONLY = ("the kloset is append-only for these credentials; run forget/prune with "
               "maintenance credentials")
SETUP_REQUESTS = 7  # users, keys, policies and the bucket, before moto checks signatures


def backup_policy(bucket: str, prefix: str) -> dict[str, Any]:
    """What docs/STORAGE.md gives the backup role: read, add, and delete its own locks only."""
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
         "Resource": f"arn:aws:s3:::{bucket}"},
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:RestoreObject",
                                       "s3:AbortMultipartUpload"],
         "Resource": f"arn:aws:s3:::{bucket}/{prefix}/*"},
        {"Effect": "Allow", "Action": "s3:DeleteObject",
         "Resource": f"arn:aws:s3:::{bucket}/{prefix}/locks/*"},
    ]}


def maintenance_policy(bucket: str) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:*",
         "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]},
    ]}


@dataclass
class AuthS3:
    endpoint: str
    bucket: str
    keys: dict[str, tuple[str, str]]  # role -> (access key id, secret)

    def url(self, prefix: str, **options: str) -> str:
        extra = "".join(f"&{k}={v}" for k, v in options.items())
        return f"s3://{self.bucket}/{prefix}?endpoint={self.endpoint}{extra}"

    def env(self, role: str, url: str) -> dict[str, str]:
        key_id, secret = self.keys[role]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PGKLOSET_", "AWS_"))}
        env.update(AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret, AWS_REGION="us-east-1",
                   AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
                   AWS_CONFIG_FILE="/nonexistent", AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
                   PGKLOSET_REPO=url, PGKLOSET_PASSPHRASE=PASSPHRASE)
        return env

    def client(self, role: str) -> Any:
        import boto3

        key_id, secret = self.keys[role]
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=key_id, aws_secret_access_key=secret)


@pytest.fixture(scope="module")
def auth_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthS3]:
    """moto in its own process, checking every request against IAM, with an Object Lock bucket."""
    import boto3

    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_REQUESTS),
           "AWS_ACCESS_KEY_ID": "setup", "AWS_SECRET_ACCESS_KEY": "setup"}
    log = open(tmp_path_factory.mktemp("moto-iam") / "log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=log, stderr=log)
    try:
        assert wait_for_port(port, timeout=30, proc=proc), "moto did not start"
        endpoint = f"http://127.0.0.1:{port}"
        bucket = "pgk-append-only"
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        keys = {}
        for role in ("backup", "maintenance"):
            iam.create_user(UserName=role)
            made = iam.create_access_key(UserName=role)["AccessKey"]
            keys[role] = (made["AccessKeyId"], made["SecretAccessKey"])
        iam.put_user_policy(UserName="backup", PolicyName="kloset",
                            PolicyDocument=json.dumps(backup_policy(bucket, "*")))
        iam.put_user_policy(UserName="maintenance", PolicyName="kloset",
                            PolicyDocument=json.dumps(maintenance_policy(bucket)))
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id="setup", aws_secret_access_key="setup",
                     ).create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
        yield AuthS3(endpoint, bucket, keys)
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def run(env: dict[str, str], *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*CLI, *args], capture_output=True, env=env, cwd=ROOT, timeout=300,
                          input=input, stdin=None if input is not None else subprocess.DEVNULL)


def ok(proc: subprocess.CompletedProcess[bytes]) -> subprocess.CompletedProcess[bytes]:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc


def one_error_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    err = proc.stderr.decode()
    assert proc.returncode != 0, err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pgkloset: error: "), lines
    return lines[0]


def keys_under(client: Any, bucket: str, prefix: str) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]


def init_kloset(s3: AuthS3, url: str, role: str = "backup") -> None:
    env = s3.env(role, url)
    code = ("from pgkloset_core.kloset.keys import KdfCost; "
            "from pgkloset_core.kloset.repository import Kloset; "
            "from pgkloset_core.storage import open_backend; import os; "
            "Kloset.init(open_backend(os.environ['PGKLOSET_REPO']), os.environ['PGKLOSET_PASSPHRASE'], "
            "kdf=KdfCost(1, 1024, 1))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()


def test_backup_credentials_add_but_never_delete(auth_s3: AuthS3) -> None:
    url = auth_s3.url("plain")
    init_kloset(auth_s3, url)
    backup, maint = auth_s3.env("backup", url), auth_s3.env("maintenance", url)
    first = os.urandom(300_000)
    second = os.urandom(300_000)
    ids = []
    for data in (first, second):
        done = ok(run(backup, "backup", "stream", "--name", "s", "--json", input=data))
        ids.append(json.loads(done.stdout)["snapshot_id"])
    assert ok(run(backup, "cat", ids[0])).stdout == first
    listing = json.loads(ok(run(backup, "snapshots", "--json")).stdout)
    assert {s["id"] for s in listing} == set(ids)

    s3 = auth_s3.client("maintenance")
    before = sorted(keys_under(s3, auth_s3.bucket, "plain/"))
    for args in (("forget", ids[0]), ("forget", "--keep-last", "1"), ("prune", "--grace", "0")):
        line = one_error_line(run(backup, *args))
        assert APPEND_ONLY in line, line
        assert auth_s3.keys["backup"][1] not in line
    assert sorted(keys_under(s3, auth_s3.bucket, "plain/")) == before, "nothing changed"
    assert keys_under(s3, auth_s3.bucket, "plain/locks/") == [], "backups remove their own locks"

    ok(run(maint, "forget", ids[0]))
    report = json.loads(ok(run(maint, "prune", "--grace", "0", "--json")).stdout)
    assert report["packs_deleted"] >= 1
    assert ok(run(backup, "cat", ids[1])).stdout == second
    assert json.loads(ok(run(maint, "check", "--read-data", "--json")).stdout)["ok"]
    assert [s["id"] for s in json.loads(ok(run(backup, "snapshots", "--json")).stdout)] == [ids[1]]


def test_object_lock_retention_on_packs_and_snapshots(auth_s3: AuthS3) -> None:
    url = auth_s3.url("locked", object_lock_days="2")
    init_kloset(auth_s3, url)
    backup, maint = auth_s3.env("backup", url), auth_s3.env("maintenance", url)
    data = os.urandom(200_000)
    sid = json.loads(ok(run(backup, "backup", "stream", "--name", "s", "--json", input=data)).stdout)[
        "snapshot_id"]
    s3 = auth_s3.client("maintenance")
    now = datetime.now(UTC)
    for prefix in ("locked/data/", "locked/index/", "locked/snapshots/"):
        for key in keys_under(s3, auth_s3.bucket, prefix):
            head = s3.head_object(Bucket=auth_s3.bucket, Key=key)
            assert head.get("ObjectLockMode") == "GOVERNANCE", key
            until = head["ObjectLockRetainUntilDate"]
            assert now + timedelta(days=1, hours=23) < until < now + timedelta(days=2, hours=1), until
    for key in ("locked/config", *keys_under(s3, auth_s3.bucket, "locked/keys/")):
        assert s3.head_object(Bucket=auth_s3.bucket, Key=key).get("ObjectLockMode") is None

    # Maintenance may forget and prune (S3 keeps the locked versions behind delete markers) ...
    ok(run(maint, "forget", sid))
    ok(run(maint, "prune", "--grace", "0"))
    assert keys_under(s3, auth_s3.bucket, "locked/data/") == []
    versions = s3.list_object_versions(Bucket=auth_s3.bucket, Prefix="locked/data/")["Versions"]
    assert versions, "the locked pack versions are still there"
    # ... but not destroy a locked version, so the data can still be brought back.
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError, match="AccessDenied"):
        s3.delete_object(Bucket=auth_s3.bucket, Key=versions[0]["Key"], VersionId=versions[0]["VersionId"])
