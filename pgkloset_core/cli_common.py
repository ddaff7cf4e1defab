"""What every CLI command shares: repository, passphrase, output, progress.

Passphrases come from the environment, a file or a terminal prompt, never
from argv, so they do not show up in ``ps`` or shell history.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from pgkloset_core.errors import UsageError
from pgkloset_core.storage import Backend, open_backend

if TYPE_CHECKING:  # imported in open(): `--help` and friends need no crypto or kloset code
    from concurrent.futures import Future

    from pgkloset_core.kloset.repository import Kloset


@dataclass
class AppContext:
    repo: str | None
    lock_wait: float
    _backend: Backend | None = None

    def backend(self) -> Backend:
        if self._backend is None:
            url = self.repo or os.environ.get("PGKLOSET_REPO", "")
            self._backend = open_backend(url)
        return self._backend

    def open(self) -> Kloset:
        from pgkloset_core.kloset.repository import Kloset

        backend = self.backend()
        Kloset.read_config(backend)  # "not a kloset" and format errors before any prompt
        return Kloset.open(backend, read_passphrase())

    def open_soon(self) -> Future[Kloset]:
        """Like ``open``, but the key unlock runs in the background (see Kloset.open_soon)."""
        from pgkloset_core.kloset.repository import Kloset

        backend = self.backend()
        Kloset.read_config(backend)
        return Kloset.open_soon(backend, read_passphrase())


pass_app = click.make_pass_decorator(AppContext)


def read_passphrase(*, new: bool = False, confirm: bool = False) -> str:
    """From PGKLOSET_[NEW_]PASSPHRASE, PGKLOSET_[NEW_]PASSPHRASE_FILE, or a prompt."""
    prefix = "PGKLOSET_NEW_PASSPHRASE" if new else "PGKLOSET_PASSPHRASE"
    value = passphrase_from_env(prefix)
    if value is not None:
        return value
    return _prompt(prefix, "new passphrase" if new else "passphrase", confirm)


def passphrase_from_env(prefix: str) -> str | None:
    """``$PREFIX``, else the first line of the file named by ``$PREFIX_FILE``, else None."""
    value = os.environ.get(prefix)
    if value:
        return value
    path = os.environ.get(f"{prefix}_FILE")
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read {prefix}_FILE {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{prefix}_FILE {path} is not UTF-8 text") from None
    value = text.splitlines()[0] if text else ""
    if not value:
        raise UsageError(f"{prefix}_FILE {path} is empty")
    return value


def _prompt(prefix: str, label: str, confirm: bool) -> str:
    try:
        tty = open("/dev/tty", "r+")  # noqa: SIM115 - closed below
    except OSError:
        raise UsageError(f"no passphrase: set {prefix} or {prefix}_FILE (no terminal to prompt on)") from None
    with tty:
        value = getpass.getpass(f"{label}: ", stream=tty)
        if confirm and getpass.getpass(f"repeat {label}: ", stream=tty) != value:
            raise UsageError("passphrases do not match")
    if not value:
        raise UsageError("an empty passphrase is not allowed")
    return value


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_seconds(text: str) -> float:
    """``90``, ``30s``, ``5m``, ``2h``, ``1d`` to seconds."""
    match = _DURATION.match(text)
    if not match:
        raise UsageError(f"invalid duration {text!r} (examples: 30s, 5m, 2h)")
    value = float(match.group(1))
    unit = match.group(2) or "s"
    return value * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


@contextlib.contextmanager
def byte_progress(label: str, total: int | None = None) -> Iterator[Any]:
    """A progress bar on a terminal; a no-op callback otherwise."""
    if not sys.stderr.isatty():
        yield lambda _n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


@contextlib.contextmanager
def status(label: str) -> Iterator[Any]:
    """A spinner with a changing message on a terminal; silent otherwise."""
    if not sys.stderr.isatty():
        yield lambda _msg: None
        return
    from rich.console import Console

    with Console(stderr=True).status(label) as st:
        yield lambda msg: st.update(f"{label}: {msg}")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
