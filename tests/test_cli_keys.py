"""Passphrases: several key files wrap one master key; add, change, remove."""

from __future__ import annotations

import json

import pytest

from pgkloset_core.errors import KlosetError
from pgkloset_core.kloset.repository import Kloset
from tests.fixtures.kloset import (
    CHEAP_KDF,
    PASSPHRASE,
    assert_one_line_error,
    kloset_state,
    object_names,
)

SECOND = "a second, longer passphrase"
THIRD = "the third one"


def with_pass(passphrase: str, new: str | None = None) -> dict[str, str | None]:
    return {"PGKLOSET_PASSPHRASE": passphrase, "PGKLOSET_NEW_PASSPHRASE": new}


def keys(run_cli, passphrase: str = PASSPHRASE) -> list[dict]:
    return json.loads(run_cli("key", "list", "--json", env_extra=with_pass(passphrase)).stdout)["keys"]


def test_add_change_and_remove_passphrases(cli_kloset, run_cli, kloset_backend) -> None:
    snapshot_id = run_cli("backup", "stream", "--name", "s", input=b"payload").stdout.decode().strip()
    (first,) = keys(run_cli)
    assert first["current"]

    # add: both passphrases open the same kloset
    proc = run_cli("key", "add", env_extra=with_pass(PASSPHRASE, SECOND))
    assert proc.stdout.startswith(b"added key ")
    for passphrase in (PASSPHRASE, SECOND):
        assert run_cli("cat", snapshot_id, env_extra=with_pass(passphrase)).stdout == b"payload"
    listed = keys(run_cli, SECOND)
    assert len(listed) == 2
    second = next(k for k in listed if k["current"])
    assert second["id"] != first["id"]

    # passwd: the second passphrase is replaced by a third; the old one stops working
    proc = run_cli("key", "passwd", env_extra=with_pass(SECOND, THIRD))
    assert b"passphrase changed" in proc.stdout
    assert_one_line_error(run_cli("snapshots", env_extra=with_pass(SECOND), check=False),
                          "wrong passphrase")
    assert run_cli("cat", snapshot_id, env_extra=with_pass(THIRD)).stdout == b"payload"
    assert run_cli("cat", snapshot_id, env_extra=with_pass(PASSPHRASE)).stdout == b"payload"
    listed = keys(run_cli, THIRD)
    assert second["id"] not in {k["id"] for k in listed} and len(listed) == 2

    # remove: never the key in use
    before = kloset_state(kloset_backend)
    current = next(k for k in listed if k["current"])
    proc = run_cli("key", "remove", current["id"][:10], env_extra=with_pass(THIRD), check=False)
    assert_one_line_error(proc, "in use")
    assert kloset_state(kloset_backend) == before

    # remove the first key through the third: now only the third passphrase works
    run_cli("key", "remove", first["id"][:10], env_extra=with_pass(THIRD))
    assert_one_line_error(run_cli("snapshots", env_extra=with_pass(PASSPHRASE), check=False),
                          "wrong passphrase")
    (only,) = keys(run_cli, THIRD)
    assert only["id"] == current["id"]

    # the last key is the one in use: removing it is refused, nothing changes
    before = kloset_state(kloset_backend)
    proc = run_cli("key", "remove", only["id"], env_extra=with_pass(THIRD), check=False)
    assert_one_line_error(proc, "refusing to remove")
    assert kloset_state(kloset_backend) == before
    assert run_cli("cat", snapshot_id, env_extra=with_pass(THIRD)).stdout == b"payload"


def test_remove_unknown_or_ambiguous_key(cli_kloset, run_cli, kloset_backend) -> None:
    run_cli("key", "add", env_extra=with_pass(PASSPHRASE, SECOND))
    before = kloset_state(kloset_backend)
    assert_one_line_error(run_cli("key", "remove", "zz", check=False), "no key file matches")
    assert_one_line_error(run_cli("key", "remove", "", check=False), "ambiguous")
    assert kloset_state(kloset_backend) == before


def test_new_passphrase_is_required(cli_kloset, run_cli, kloset_backend) -> None:
    """No new passphrase in the environment and no terminal: a clear error, no key added."""
    before = kloset_state(kloset_backend)
    for args in (("key", "add"), ("key", "passwd")):
        proc = run_cli(*args, env_extra={"PGKLOSET_NEW_PASSPHRASE": None}, check=False)
        assert_one_line_error(proc, "PGKLOSET_NEW_PASSPHRASE")
    assert kloset_state(kloset_backend) == before


def test_refuses_to_remove_the_last_key_file(lib_kloset, kloset_backend) -> None:
    """Two sessions: one removes the other's key; the other may then not remove the last one."""
    lib_kloset.add_key(SECOND, CHEAP_KDF)
    first = Kloset.open(kloset_backend, PASSPHRASE)
    second = Kloset.open(kloset_backend, SECOND)
    second.remove_key(first.key_name)
    assert object_names(kloset_backend, "keys/") == [second.key_name]
    with pytest.raises(KlosetError, match="last key file"):
        first.remove_key(second.key_name)
    assert object_names(kloset_backend, "keys/") == [second.key_name]
    with pytest.raises(KlosetError, match="in use"):
        second.remove_key(second.key_name)
