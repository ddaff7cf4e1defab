"""Find PostgreSQL binaries by major version.

pg_dump refuses to dump a server newer than itself, and a data directory only
starts under binaries of its own major version, so every caller asks for a
major version and gets one directory of tools, or one clear error saying what
was needed, what was found and where we looked.

Search order: a configured bin dir, PATH, Debian's /usr/lib/postgresql/<major>/bin,
then the bin dir of the `pgserver` wheel (PostgreSQL 16 for tests) if installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pgkloset_core.errors import KlosetError

DEBIAN_ROOT = Path("/usr/lib/postgresql")
_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+((\d+)(?:\.\d+)*\S*)")


class NoSuitableBinaries(KlosetError):
    """No PostgreSQL installation offers the tool at the needed major version."""


@dataclass(frozen=True)
class PgBinaries:
    """One directory of PostgreSQL tools of a single version."""

    bin_dir: Path
    major: int
    version: str
    source: str = "configured"

    def path(self, tool: str) -> Path:
        """Absolute path of `tool` in this directory; raises when it is missing."""
        candidate = self.bin_dir / tool
        if not _is_executable(candidate):
            raise NoSuitableBinaries(
                f"{tool} is not installed in {self.bin_dir} (PostgreSQL {self.version})"
            )
        return candidate

    def has(self, tool: str) -> bool:
        """Whether `tool` exists (and is executable) in this directory."""
        return _is_executable(self.bin_dir / tool)

    @property
    def install_root(self) -> Path:
        """The installation prefix (parent of bin/), used to relocate a private copy."""
        return self.bin_dir.parent

    @classmethod
    def from_dir(cls, bin_dir: str | os.PathLike[str], tool: str = "pg_dump",
                 source: str = "configured") -> PgBinaries:
        """Describe the tools in `bin_dir`, reading the version from `tool --version`."""
        directory = Path(bin_dir).resolve()
        exe = directory / tool
        if not _is_executable(exe):
            raise NoSuitableBinaries(f"{tool} is not installed in {directory}")
        version, major = tool_version(exe)
        return cls(bin_dir=directory, major=major, version=version, source=source)

    def __str__(self) -> str:
        return f"PostgreSQL {self.version} in {self.bin_dir} ({self.source})"


def _is_executable(path: Path) -> bool:
    # os.path.isfile, unlike Path.is_file, treats EACCES (e.g. /root/... on PATH) as "no".
    return os.path.isfile(path) and os.access(path, os.X_OK)


def tool_version(exe: Path) -> tuple[str, int]:
    """(version, major) of a PostgreSQL tool, e.g. ("15.18", 15); cached per file state."""
    stat = exe.stat()
    return _tool_version(str(exe), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=256)
def _tool_version(exe: str, _mtime_ns: int, _size: int) -> tuple[str, int]:
    try:
        out = subprocess.run(
            [exe, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise NoSuitableBinaries(f"cannot run {exe} --version: {exc}") from exc
    match = _VERSION_RE.search(out)
    if not match:
        raise NoSuitableBinaries(f"cannot read a PostgreSQL version from {exe}: {out.strip()!r}")
    return match.group(1), int(match.group(2))


def pgserver_bin_dir() -> Path | None:
    """Bin dir of the `pgserver` wheel, found without importing it (import is slow)."""
    try:
        spec = importlib.util.find_spec("pgserver")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        bin_dir = Path(location) / "pginstall" / "bin"
        if os.path.isdir(bin_dir):
            return bin_dir
    return None


def _candidate_dirs(bin_dir: str | os.PathLike[str] | None, tool: str) -> list[tuple[Path, str]]:
    """Directories to inspect, in search order, with the name of their source."""
    found: list[tuple[Path, str]] = []
    if bin_dir is not None:
        found.append((Path(bin_dir), "configured"))
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if not entry:
            continue
        exe = Path(entry) / tool
        if not _is_executable(exe):
            continue
        real = exe.resolve()
        if real.name == "pg_wrapper":  # Debian's dispatcher: the real dirs come next
            continue
        found.append((real.parent, "PATH"))
    if os.path.isdir(DEBIAN_ROOT):
        majors = sorted(
            (p for p in DEBIAN_ROOT.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)
        )
        found.extend((p / "bin", "debian") for p in majors)
    wheel = pgserver_bin_dir()
    if wheel is not None:
        found.append((wheel, "pgserver"))
    return found


def _where_we_looked(bin_dir: str | os.PathLike[str] | None) -> str:
    places = []
    if bin_dir is not None:
        places.append(f"configured bin dir {bin_dir}")
    places += ["PATH", f"{DEBIAN_ROOT}/*/bin", "the pgserver wheel"]
    return ", ".join(places)


def available_binaries(bin_dir: str | os.PathLike[str] | None = None,
                       tool: str = "pg_dump") -> list[PgBinaries]:
    """Every distinct installation that has `tool`, in search order."""
    seen: set[Path] = set()
    result: list[PgBinaries] = []
    for directory, source in _candidate_dirs(bin_dir, tool):
        exe = directory / tool
        if not _is_executable(exe):
            continue
        real = directory.resolve()
        if real in seen:
            continue
        seen.add(real)
        try:
            result.append(PgBinaries.from_dir(real, tool=tool, source=source))
        except NoSuitableBinaries:
            continue  # a broken install is not a candidate; the final error lists what works
    return result


def find_binaries(min_major: int | None = None, exact_major: int | None = None,
                  bin_dir: str | os.PathLike[str] | None = None,
                  tool: str = "pg_dump") -> PgBinaries:
    """The installation to use for `tool`.

    With `exact_major`, only that major fits (starting a data directory); with
    `min_major`, the lowest major >= it fits (dumping a server needs a client at
    least as new). A configured `bin_dir` that fits wins over the others.
    """

    def fits(b: PgBinaries) -> bool:
        if exact_major is not None and b.major != exact_major:
            return False
        return min_major is None or b.major >= min_major

    if bin_dir is not None:  # a configured dir that fits wins: the others need no probing
        try:
            mine = PgBinaries.from_dir(bin_dir, tool=tool)
        except NoSuitableBinaries:
            mine = None
        if mine is not None and fits(mine):
            return mine
    candidates = available_binaries(bin_dir, tool)
    fitting = [b for b in candidates if fits(b)]
    configured = [b for b in fitting if b.source == "configured"]
    if configured:
        return configured[0]
    if fitting:
        return min(fitting, key=lambda b: b.major)  # stable: ties keep search order
    if exact_major is not None:
        wanted = f"major version {exact_major}"
    elif min_major is not None:
        wanted = f"major version {min_major} or newer"
    else:
        wanted = "any version"
    found = "; ".join(f"{b.version} in {b.bin_dir}" for b in candidates) or "none"
    hint = ""
    if shutil.which("apt-get") and (exact_major or min_major):
        hint = f" Install postgresql-client-{exact_major or min_major} (or the server package)."
    raise NoSuitableBinaries(
        f"no PostgreSQL {tool} of {wanted}; found: {found}; looked in "
        f"{_where_we_looked(bin_dir)}.{hint} Or point the bin dir setting at one."
    )
