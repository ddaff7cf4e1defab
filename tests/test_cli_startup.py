"""The CLI starts without loading what the command does not use.

Building the command line must not import psycopg, the cloud SDKs, or the
drill, physical, instance, prune and sync machinery: each command imports
those when it runs. Every check runs in a fresh interpreter, since this test
process has long since imported everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Not loaded by `import pgkloset_core.cli` (nor by --help, nor by `snapshots`).
HEAVY = (
    "psycopg",
    "boto3",
    "botocore",
    "paramiko",
    "pgkloset_core.postgres.pgenv",
    "pgkloset_core.postgres.logical",
    "pgkloset_core.postgres.restore_logical",
    "pgkloset_core.postgres.drill",
    "pgkloset_core.postgres.physical",
    "pgkloset_core.postgres.instance",
    "pgkloset_core.kloset.prune",
    "pgkloset_core.kloset.forget",
    "pgkloset_core.kloset.retention",
    "pgkloset_core.kloset.sync",
    "pgkloset_core.kloset.check",
    "pgkloset_core.kloset.thaw",
    "pgkloset_core.storage.s3",
    "pgkloset_core.storage.sftp",
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGKLOSET_")}
    env.update(extra)
    return env


def _python(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env or _env(),
                          capture_output=True, text=True, timeout=120)


def _loaded_after(code: str, env: dict[str, str] | None = None) -> set[str]:
    """The modules of HEAVY that are in sys.modules after running ``code``."""
    probe = (f"import json, sys\n{code}\n"
             f"print(json.dumps(sorted(m for m in {list(HEAVY)!r} if m in sys.modules)))")
    done = _python("-c", probe, env=env)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_import_cli_loads_no_heavy_module() -> None:
    assert _loaded_after("import pgkloset_core.cli") == set()


def test_probe_sees_heavy_modules() -> None:
    """The probe itself works: importing the logical backup module does load psycopg."""
    loaded = _loaded_after("import pgkloset_core.postgres.logical")
    assert {"psycopg", "pgkloset_core.postgres.pgenv", "pgkloset_core.postgres.logical"} <= loaded


def test_import_cli_registers_every_command() -> None:
    """Lazy imports did not make an extension module drop out of the command line."""
    done = _python("-c", "import json\nfrom pgkloset_core.cli import backup, cli\n"
                   "print(json.dumps([sorted(cli.commands), sorted(backup.commands)]))")
    assert done.returncode == 0, done.stderr
    commands, backups = json.loads(done.stdout)
    assert {"init", "snapshots", "cat", "check", "key", "backup", "restore", "drill", "forget",
            "prune", "unlock", "sync"} <= set(commands)
    assert set(backups) == {"stream", "logical", "physical"}


@pytest.mark.parametrize(("args", "usage", "text"), [
    ((), "Usage: pgkloset [OPTIONS] COMMAND [ARGS]...", "drill"),
    (("backup", "logical"), "Usage: pgkloset backup logical [OPTIONS]", "$PGKLOSET_DSN"),
    (("backup", "physical"), "Usage: pgkloset backup physical [OPTIONS]", "PGKLOSET_DSN"),
    (("restore",), "Usage: pgkloset restore [OPTIONS] SNAPSHOT", "$PGKLOSET_RESTORE_DSN"),
    (("drill",), "Usage: pgkloset drill [OPTIONS] SNAPSHOT", "--sql-check"),
    (("check",), "Usage: pgkloset check [OPTIONS]", "--read-data"),
    (("prune",), "Usage: pgkloset prune [OPTIONS]", "[default: 0.25;"),
    (("forget",), "Usage: pgkloset forget [OPTIONS] [SNAPSHOT...]", "--keep-daily"),
    (("sync",), "Usage: pgkloset sync [OPTIONS] [SNAPSHOT...]", "--to URL"),
])
def test_help_still_works(args: tuple[str, ...], usage: str, text: str) -> None:
    code = ("import sys\nfrom pgkloset_core.cli import main\n"
            f"rc = main({[*args, '--help']!r})\n"
            f"print('EXIT', rc)\n"
            f"print('HEAVY', sorted(m for m in {list(HEAVY)!r} if m in sys.modules))")
    done = _python("-c", code)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert usage in out and text in out, out
    assert "EXIT 0" in out
    assert "HEAVY []" in out, out


@pytest.mark.parametrize("args", [(), ("backup", "logical"), ("restore",), ("drill",),
                                  ("check",)])
def test_help_as_a_module(args: tuple[str, ...]) -> None:
    done = _python("-m", "pgkloset_core.cli", *args, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: pgkloset"), done.stdout
    assert done.stderr == ""


def test_snapshots_on_fresh_kloset_needs_no_psycopg(tmp_path: Path) -> None:
    repo = tmp_path / "kloset"
    env = _env(PGKLOSET_PASSPHRASE="startup-test")
    init = _python("-m", "pgkloset_core.cli", "--repo", str(repo), "init", env=env)
    assert init.returncode == 0, init.stderr
    done = _python("-X", "importtime", "-m", "pgkloset_core.cli", "--repo", str(repo),
                   "snapshots", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
    timed = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
             if line.startswith("import time:")]
    assert "pgkloset_core.kloset.repository" in timed  # -X importtime did report
    assert "psycopg" not in done.stderr
    for module in ("boto3", "paramiko", "pgkloset_core.postgres.drill",
                   "pgkloset_core.kloset.prune", "pgkloset_core.kloset.sync"):
        assert module not in timed


def test_snapshots_loads_no_heavy_module(tmp_path: Path) -> None:
    """The same with sys.modules, which also sees modules loaded by importlib."""
    repo = tmp_path / "kloset"
    env = _env(PGKLOSET_PASSPHRASE="startup-test")
    init = _python("-m", "pgkloset_core.cli", "--repo", str(repo), "init", env=env)
    assert init.returncode == 0, init.stderr
    code = ("import contextlib, io\nfrom pgkloset_core.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            f"    assert main(['--repo', {str(repo)!r}, 'snapshots', '--json']) == 0\n"
            "assert out.getvalue().strip() == '[]', out.getvalue()")
    assert _loaded_after(code, env=env) == set()


@pytest.mark.parametrize(("url", "backend_module", "other"), [
    ("s3://bucket/prefix", "pgkloset_core.storage.s3", "pgkloset_core.storage.sftp"),
    ("sftp://user@127.0.0.1/path", "pgkloset_core.storage.sftp", "pgkloset_core.storage.s3"),
])
def test_open_backend_loads_only_the_backend_of_the_scheme(
        tmp_path: Path, url: str, backend_module: str, other: str) -> None:
    """A local path loads neither cloud backend; s3:// and sftp:// load their own only."""
    local = _loaded_after("from pgkloset_core.storage import open_backend\n"
                          f"open_backend({str(tmp_path / 'k')!r})")
    assert local == set()
    # Constructing the remote backend may fail here (no credentials, no host), but by
    # then its module is loaded and the other one must not be.
    remote = _loaded_after("from pgkloset_core.storage import open_backend\n"
                           "try:\n"
                           f"    open_backend({url!r})\n"
                           "except Exception:\n"
                           "    pass")
    assert backend_module in remote
    assert other not in remote


def test_duplicated_constants_agree() -> None:
    """Constants repeated in light modules equal the ones in the modules they stand in for."""
    from pgkloset_core.kloset import commands, prune
    from pgkloset_core.postgres import names, pgenv

    assert names.DSN_ENV == pgenv.DSN_ENV
    assert commands.DEFAULT_MAX_REPACK_RATIO == prune.DEFAULT_MAX_REPACK_RATIO
