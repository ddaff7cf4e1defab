"""Expected failures: one clear line, a non-zero exit, and nothing changed."""

from __future__ import annotations

import json
import subprocess

import pytest

from pgkloset_core.kloset.repository import CONFIG_NAME, Kloset
from pgkloset_core.storage import open_backend
from tests.fixtures.kloset import (
    CLI,
    PASSPHRASE,
    assert_one_line_error,
    kloset_state,
)


def assert_fails_cleanly(run_cli, backend, *args: str, needles: tuple[str, ...] = (),
                         env_extra=None, input=None) -> str:
    """Run a command expected to fail; the kloset must be byte-identical afterwards."""
    before = kloset_state(backend)
    proc = run_cli(*args, env_extra=env_extra, input=input, check=False)
    line = assert_one_line_error(proc, *needles)
    assert proc.stdout == b"", proc.stdout
    assert kloset_state(backend) == before, f"pgkloset {' '.join(args)} changed the kloset"
    return line


@pytest.fixture
def populated(lib_kloset, run_cli):
    """A kloset with two snapshots (made through the CLI on a library-made kloset)."""
    ids = []
    for i in range(2):
        ids.append(json.loads(run_cli("backup", "stream", "--name", "s", "--json",
                                      input=f"data {i}".encode()).stdout)["snapshot_id"])
    return lib_kloset, ids


EVERY_COMMAND = [
    ("snapshots",),
    ("cat", "latest"),
    ("check", "--read-data"),
    ("backup", "stream", "--name", "x"),
    ("forget", "latest"),
    ("key", "list"),
    ("key", "add"),
    ("unlock", "--force"),
]


@pytest.mark.parametrize("args", EVERY_COMMAND, ids=lambda a: "-".join(a))
def test_wrong_passphrase(populated, run_cli, kloset_backend, args) -> None:
    assert_fails_cleanly(run_cli, kloset_backend, *args, input=b"some data",
                         env_extra={"PGKLOSET_PASSPHRASE": "not the passphrase",
                                    "PGKLOSET_NEW_PASSPHRASE": "another"},
                         needles=("wrong passphrase",))


def test_no_passphrase_and_no_terminal(populated, run_cli, kloset_backend) -> None:
    assert_fails_cleanly(run_cli, kloset_backend, "snapshots", env_extra={"PGKLOSET_PASSPHRASE": None},
                         needles=("PGKLOSET_PASSPHRASE",))


def test_passphrase_file(populated, run_cli, tmp_path) -> None:
    good = tmp_path / "pass"
    good.write_text(PASSPHRASE + "\n")
    proc = run_cli("snapshots", "--json", env_extra={"PGKLOSET_PASSPHRASE": None,
                                                     "PGKLOSET_PASSPHRASE_FILE": str(good)})
    assert len(json.loads(proc.stdout)) == 2
    missing = run_cli("snapshots", check=False, env_extra={
        "PGKLOSET_PASSPHRASE": None, "PGKLOSET_PASSPHRASE_FILE": str(tmp_path / "nope")})
    assert_one_line_error(missing, "PGKLOSET_PASSPHRASE_FILE")


@pytest.mark.parametrize("args", EVERY_COMMAND, ids=lambda a: "-".join(a))
def test_not_a_kloset_empty_path(run_cli, tmp_path, args) -> None:
    """A path that does not exist: the error says so and the path is not created."""
    target = tmp_path / "nothing-here"
    backend = open_backend(str(target))
    assert_fails_cleanly(run_cli, backend, "--repo", str(target), *args, input=b"x",
                         needles=("no kloset",))
    assert not target.exists()


def test_not_a_kloset_other_folder(run_cli, tmp_path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "config").write_text("[core]\nbare = false\n")  # a git config, say
    (folder / "cat.jpg").write_bytes(b"\xff\xd8\xff" + bytes(100))
    backend = open_backend(str(folder))
    for args in (("snapshots",), ("backup", "stream", "--name", "x"), ("check",)):
        assert_fails_cleanly(run_cli, backend, "--repo", str(folder), *args, input=b"x",
                             needles=("not a pgkloset config",))


def test_init_refuses_existing_kloset_and_non_empty_folder(populated, run_cli, kloset_backend,
                                                           tmp_path) -> None:
    assert_fails_cleanly(run_cli, kloset_backend, "init", needles=("already exists",))
    folder = tmp_path / "busy"
    folder.mkdir()
    (folder / "file").write_text("keep me")
    assert_fails_cleanly(run_cli, open_backend(str(folder)), "--repo", str(folder), "init",
                         needles=("not empty",))


def test_no_repository_given(run_cli, tmp_path) -> None:
    proc = run_cli("snapshots", env_extra={"PGKLOSET_REPO": None}, check=False)
    assert_one_line_error(proc, "--repo")


@pytest.mark.parametrize("args", [("snapshots",), ("cat", "latest"), ("check",),
                                  ("backup", "stream", "--name", "x")], ids=lambda a: "-".join(a))
def test_newer_format_version(populated, run_cli, kloset_backend, args) -> None:
    doc = json.loads(kloset_backend.read(CONFIG_NAME))
    doc["version"] = 2
    kloset_backend.write(CONFIG_NAME, json.dumps(doc, indent=1).encode(), overwrite=True)
    assert_fails_cleanly(run_cli, kloset_backend, *args, input=b"x",
                         needles=("version 2", "upgrade pgkloset"))


def test_unknown_snapshot_id(populated, run_cli, kloset_backend) -> None:
    _kloset, ids = populated
    unknown = next(c * 64 for c in "0123456789abcdef" if not any(i.startswith(c) for i in ids))
    for args in (("cat", unknown), ("cat", unknown[:8]), ("forget", ids[0], unknown),
                 ("cat", "not-hex"), ("forget", "zzz")):
        assert_fails_cleanly(run_cli, kloset_backend, *args, needles=("no snapshot matches",))
    assert len(json.loads(run_cli("snapshots", "--json").stdout)) == 2


def test_latest_of_an_empty_kloset(lib_kloset, run_cli, kloset_backend) -> None:
    assert_fails_cleanly(run_cli, kloset_backend, "cat", "latest", needles=("no snapshots",))


def test_ambiguous_prefix(lib_kloset, run_cli, kloset_backend) -> None:
    # With 17 snapshots two must share a first hex digit; usually far fewer are needed.
    by_first: dict[str, list[str]] = {}
    for i in range(17):
        writer = lib_kloset.writer(kind="test")
        writer.add_bytes("s", f"snapshot {i}".encode())
        snap = writer.commit()
        by_first.setdefault(snap.id[0], []).append(snap.id)
        if len(by_first[snap.id[0]]) == 2:
            break
    prefix, pair = next((p, ids) for p, ids in by_first.items() if len(ids) == 2)
    for args in (("cat", prefix), ("forget", prefix), ("forget", pair[0], prefix)):
        assert_fails_cleanly(run_cli, kloset_backend, *args, needles=("ambiguous", repr(prefix)))
    # A longer prefix that tells them apart works.
    common = 0
    while pair[0][common] == pair[1][common]:
        common += 1
    assert run_cli("cat", pair[1][: common + 1]).stdout.startswith(b"snapshot ")


def test_missing_entry_name(populated, run_cli, kloset_backend) -> None:
    assert_fails_cleanly(run_cli, kloset_backend, "cat", "latest", "no-such-entry",
                         needles=("no entry 'no-such-entry'",))


def test_cat_without_entry_of_multi_entry_snapshot(lib_kloset, run_cli, kloset_backend) -> None:
    writer = lib_kloset.writer(kind="test")
    writer.add_bytes("a", b"1")
    writer.add_bytes("b", b"2")
    writer.commit()
    assert_fails_cleanly(run_cli, kloset_backend, "cat", "latest", needles=("name one", "a, b"))
    assert run_cli("cat", "latest", "b").stdout == b"2"


def test_bad_arguments_are_usage_errors(populated, run_cli, kloset_backend) -> None:
    before = kloset_state(kloset_backend)
    proc = run_cli("--lock-wait", "soon", "snapshots", check=False)
    assert_one_line_error(proc, "invalid duration")
    proc = run_cli("backup", "stream", check=False)  # --name missing: click's own usage error
    assert proc.returncode == 2 and b"Traceback" not in proc.stderr
    assert b"--name" in proc.stderr
    assert kloset_state(kloset_backend) == before


def test_library_sees_the_same_errors(populated, kloset_backend) -> None:
    """The CLI's messages come from typed library errors."""
    from pgkloset_core.errors import EntryNotFound, SnapshotNotFound, WrongPassphrase

    with pytest.raises(WrongPassphrase):
        Kloset.open(kloset_backend, "nope")
    kloset = Kloset.open(kloset_backend, PASSPHRASE)
    with pytest.raises(SnapshotNotFound):
        kloset.resolve("0" * 63 + "g")
    assert issubclass(EntryNotFound, Exception)


def test_cat_to_a_full_disk(lib_kloset, cli_env) -> None:
    """Writing the restored bytes fails (ENOSPC on stdout): one line, no traceback."""
    writer = lib_kloset.writer(kind="test")
    writer.add_bytes("s", bytes(3 * 1024 * 1024))
    writer.commit()
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([*CLI, "cat", "latest"], stdout=full, stderr=subprocess.PIPE,
                              env=cli_env, timeout=120)
    proc.stdout = b""
    assert_one_line_error(proc, "standard output", "No space left")


def test_cat_into_a_pipe_closed_early(lib_kloset, popen_cli) -> None:
    """`pgkloset cat latest | head -c 10`: a quiet, non-zero exit."""
    writer = lib_kloset.writer(kind="test")
    writer.add_bytes("s", bytes(8 * 1024 * 1024))
    writer.commit()
    proc = popen_cli("cat", "latest", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(10) == bytes(10)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) != 0
    assert b"Traceback" not in err and b"Exception ignored" not in err, err
