"""Run a command pipeline and measure it: wall time, CPU, peak RSS, bytes read.

Every stage is a child process of ours, reaped with ``wait4`` so its own
rusage (which includes the children it waited for, e.g. pg_dump under
pgkloset) is known separately; its I/O counters are read from
``/proc/PID/io`` while it is still a zombie (``waitid(WNOWAIT)``).

Peak RSS needs care: a child forked from this (large) Python process
carries our memory high-water mark into its own ``ru_maxrss`` (the kernel
records the old address space's peak at exec). So each stage runs under GNU
time, itself a small process: the ``%M`` it reports for its child is the
tool's own peak (or its largest reaped child's), untouched by ours.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class BenchError(RuntimeError):
    """A measured command failed: the benchmark cannot go on."""


@dataclass
class Stage:
    """One process of a pipeline (its stdout feeds the next stage's stdin)."""

    name: str
    argv: Sequence[str | os.PathLike[str]]
    env: Mapping[str, str] | None = None
    cwd: str | None = None


@dataclass
class ProcStat:
    name: str
    user_s: float
    sys_s: float
    maxrss_mib: float  # ru_maxrss: this process or the largest child it reaped
    rchar: int  # bytes it (and reaped children) read through read(2) and friends
    returncode: int


@dataclass
class Measurement:
    label: str
    wall_s: float
    cpu_s: float  # user + sys of every stage and the children they reaped
    peak_rss_mib: float  # the largest ru_maxrss among the stages
    load_before: list[float]
    load_after: list[float]
    procs: list[ProcStat]
    extra: dict[str, Any] = field(default_factory=dict)
    stdout: str = ""
    # The whole host's CPU over the run (/proc/stat, every core): busy is what
    # every process used (the server's backends included), steal what the
    # hypervisor gave to other guests while this one wanted to run.
    host_busy_s: float = 0.0
    host_steal_s: float = 0.0

    def rss_of(self, name: str) -> float:
        return max((p.maxrss_mib for p in self.procs if p.name == name), default=0.0)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.pop("stdout")
        doc["wall_s"] = round(self.wall_s, 3)
        doc["cpu_s"] = round(self.cpu_s, 3)
        doc["peak_rss_mib"] = round(self.peak_rss_mib, 1)
        doc["load_before"] = [round(x, 2) for x in self.load_before]
        doc["load_after"] = [round(x, 2) for x in self.load_after]
        doc["host_busy_s"] = round(self.host_busy_s, 2)
        doc["host_steal_s"] = round(self.host_steal_s, 2)
        return doc


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_floor(host_busy_s: float, limit_wall_s: float, cores: int | None = None) -> float:
    """The lowest wall-time ratio to the limit the run's CPU allowed.

    ``host_busy_s`` of work, spread perfectly over every core, takes
    ``host_busy_s / cores`` seconds; a run whose ratio sits at this floor was
    bound by the host's CPU (pgkloset's own, pg_dump's and the server's all
    together), not by waiting in its pipeline.
    """
    n = cores or os.cpu_count() or 1
    return host_busy_s / n / limit_wall_s if limit_wall_s > 0 else 0.0


def host_cpu() -> tuple[float, float]:
    """(busy, steal) CPU-seconds of every core since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0, 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq) / _TICK, steal / _TICK


def _rchar(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def _timed(argv: list[str], out: str) -> list[str]:
    if GNU_TIME is None:
        return argv
    return [GNU_TIME, "-o", out, "-f", "rss_kib=%M", *argv]


def _rss_from(path: str) -> float | None:
    try:
        for line in reversed(Path(path).read_text().splitlines()):
            if line.startswith("rss_kib="):
                return int(line.split("=", 1)[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return None


def _reap(proc: subprocess.Popen[bytes], name: str, rss_file: str) -> ProcStat:
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    rchar = _rchar(proc.pid)
    _pid, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss = _rss_from(rss_file)
    return ProcStat(name=name, user_s=ru.ru_utime, sys_s=ru.ru_stime,
                    maxrss_mib=rss if rss is not None else ru.ru_maxrss / 1024.0, rchar=rchar,
                    returncode=proc.returncode)


def run(label: str, stages: Sequence[Stage], *, stdin_path: str | None = None,
        stdout_path: str | None = None, capture: bool = False,
        allowed: Sequence[int] = (0,)) -> Measurement:
    """Run the pipeline to its end; raise BenchError when a stage fails."""
    errs = [tempfile.TemporaryFile() for _ in stages]  # noqa: SIM115 - closed below
    tmpdir = tempfile.TemporaryDirectory(prefix="bench-time-")
    rss_files = [os.path.join(tmpdir.name, f"{i}.time") for i in range(len(stages))]
    procs: list[subprocess.Popen[bytes]] = []
    stdin_file = open(stdin_path, "rb") if stdin_path else None  # noqa: SIM115
    if capture:
        out_target: Any = subprocess.PIPE
    elif stdout_path:
        out_target = open(stdout_path, "wb")  # noqa: SIM115
    else:
        out_target = subprocess.DEVNULL
    load_before = list(os.getloadavg())
    busy_before, steal_before = host_cpu()
    started = time.perf_counter()
    try:
        prev: Any = stdin_file if stdin_file is not None else subprocess.DEVNULL
        for i, stage in enumerate(stages):
            last = i == len(stages) - 1
            proc = subprocess.Popen(
                _timed([str(a) for a in stage.argv], rss_files[i]), stdin=prev,
                stdout=out_target if last else subprocess.PIPE, stderr=errs[i],
                env=dict(stage.env) if stage.env is not None else None, cwd=stage.cwd)
            if prev is not subprocess.DEVNULL and prev is not stdin_file:
                prev.close()  # only the next stage holds the read end now
            prev = proc.stdout
            procs.append(proc)
        out = procs[-1].stdout.read() if capture and procs[-1].stdout else b""
        stats = [_reap(p, s.name, f) for p, s, f in zip(procs, stages, rss_files, strict=True)]
        wall = time.perf_counter() - started
        busy_after, steal_after = host_cpu()
    except BaseException:
        for p in procs:
            if p.returncode is None:
                p.kill()
                p.wait()
        raise
    finally:
        tmpdir.cleanup()
        if stdin_file is not None:
            stdin_file.close()
        if hasattr(out_target, "close"):
            out_target.close()
    load_after = list(os.getloadavg())
    failed = [(s, e) for s, e in zip(stats, errs, strict=True) if s.returncode not in allowed]
    if failed:
        # A stage killed by SIGPIPE is a victim: report the one that failed on its own.
        stat, err = sorted(failed, key=lambda f: f[0].returncode < 0)[0]
        err.seek(0)
        tail = err.read().decode("utf-8", "replace").strip().splitlines()[-15:]
        raise BenchError(f"{label}: {stat.name} exited {stat.returncode}:\n" + "\n".join(tail))
    for e in errs:
        e.close()
    return Measurement(
        label=label, wall_s=wall, cpu_s=sum(s.user_s + s.sys_s for s in stats),
        peak_rss_mib=max(s.maxrss_mib for s in stats), load_before=load_before,
        load_after=load_after, procs=stats, stdout=out.decode("utf-8", "replace"),
        host_busy_s=busy_after - busy_before, host_steal_s=steal_after - steal_before)


def tree_bytes(path: str | os.PathLike[str]) -> int:
    """Apparent size of everything under `path` (what ``du -sb`` prints)."""
    total = 0
    for dirpath, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total
