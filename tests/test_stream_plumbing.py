"""The plumbing under every backup stream: tool pipes and fixed-size cutting."""

from __future__ import annotations

import fcntl
import io
import os
import subprocess

import pytest

from pgkloset_core.kloset.reader import iter_refs_of
from pgkloset_core.postgres.pgenv import PIPE_SIZE, TAIL_LINES, ToolFailed, ToolProcess


def test_tool_pipes_are_widened() -> None:
    """pg_dump may run 1 MiB ahead of the reader, not 64 KiB."""
    with ToolProcess(["cat"], dict(os.environ), what="cat", stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE) as tool:
        sizes = [fcntl.fcntl(p.fileno(), fcntl.F_GETPIPE_SZ) for p in (tool.stdin, tool.stdout)]
        tool.stdin.close()
        tool.stdout.read()
        tool.check()
    assert sizes == [PIPE_SIZE, PIPE_SIZE]


class _Dribble(io.RawIOBase):
    """A stream that returns at most 1000 bytes per read, like a slow pipe."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), 1000, len(self._data))
        b[:n] = self._data[:n]
        self._data = self._data[n:]
        return n


def test_fixed_cuts_are_whole_chunks_even_from_short_reads(lib_kloset) -> None:
    data = os.urandom(5 * lib_kloset.config.avg_chunk + 123)
    with lib_kloset.writer(kind="stream") as w:
        w.add_stream("f", _Dribble(data), fixed=True)
        snap = w.commit()
    lengths = [n for _id, n in iter_refs_of(lib_kloset, snap, snap.entries[0])]
    assert lengths == [lib_kloset.config.avg_chunk] * 5 + [123]
    assert b"".join(lib_kloset.read_entry(snap, snap.entries[0])) == data


def test_tools_run_unbuffered_where_stdbuf_is_missing_or_broken(tmp_path, monkeypatch) -> None:
    """stdbuf only speeds a tool up: absent or failing, the tool runs as it is."""
    from pgkloset_core.postgres import pgenv

    broken = tmp_path / "stdbuf"
    broken.write_text("#!/bin/sh\necho 'stdbuf: failed to find libstdbuf.so' >&2\nexit 125\n")
    broken.chmod(0o755)
    found = []
    for path in (str(tmp_path), str(tmp_path / "nothing-here"), os.environ["PATH"]):
        monkeypatch.setenv("PATH", path)
        pgenv._working_stdbuf.cache_clear()
        found.append(pgenv.stdio_buffered(["pg_dump", "-Fc"], stdout=True))
    pgenv._working_stdbuf.cache_clear()
    assert found[:2] == [["pg_dump", "-Fc"], ["pg_dump", "-Fc"]]
    assert found[2][1:] == ["--output=1M", "pg_dump", "-Fc"]  # the real one, on this machine


def test_a_tool_error_keeps_its_first_error_line_ahead_of_a_long_quoted_query() -> None:
    """pg_dump killed mid-query prints its error, then the whole query: the cause must stay."""
    script = ("echo 'pg_dump: error: query failed: server closed the connection' >&2; "
              "echo 'pg_dump: detail: Query was: SELECT p.oid' >&2; "
              "for i in $(seq 1 40); do echo \"  OR p.oid = pg_cast.castfunc_$i\" >&2; done; "
              "exit 1")
    with (ToolProcess(["sh", "-c", script], dict(os.environ), what="pg_dump") as tool,
          pytest.raises(ToolFailed) as info):
        tool.check()
    message = str(info.value)
    assert message.startswith("pg_dump exited with code 1: pg_dump: error: query failed: server")
    assert " | ... | " in message
    assert message.endswith("castfunc_40")
    assert "Query was" not in message and f"castfunc_{40 - TAIL_LINES} |" not in message
    assert message.count(" | ") == 1 + TAIL_LINES  # error, "...", the tail


def test_a_tool_error_without_skipped_lines_is_its_whole_stderr_once() -> None:
    script = ("echo 'psql:/x.sql:3: ERROR:  relation \"t\" does not exist' >&2; "
              "echo 'one more' >&2; exit 3")
    with (ToolProcess(["sh", "-c", script], dict(os.environ), what="psql") as tool,
          pytest.raises(ToolFailed) as info):
        tool.check()
    assert str(info.value) == ('psql exited with code 3: psql:/x.sql:3: ERROR:  relation "t" '
                               'does not exist | one more')
