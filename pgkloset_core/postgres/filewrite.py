"""Writing restored files past the page cache (O_DIRECT), where the filesystem allows it.

A physical restore writes the whole cluster once and then only syncs it.
Through the page cache every byte is copied into a fresh cache page, which
costs system time (on the benchmark's guest 1.7-2 CPU-seconds per GB when
the pages come back from the host), then written back by ``sync``; and it
evicts whatever the machine had cached, the running databases' pages
included. With O_DIRECT the bytes go from one reused, aligned buffer to
the disk: no cache pages, nothing left dirty for the sync.

O_DIRECT needs the buffer, the file offset and the length aligned to the
device's block size: whole ALIGN-sized blocks are written direct, a file's
last partial block through the page cache (the flag cleared on the open
file). A filesystem that refuses O_DIRECT (EINVAL on open or on a write)
gets ordinary writes from then on; the bytes written are the same either
way.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from pathlib import Path

ALIGN = 4096  # a multiple of every common logical block size (512, 4096)
BUFFER_SIZE = 1 << 20  # per direct write: large enough for the disk, small enough to reuse
O_DIRECT = getattr(os, "O_DIRECT", 0)
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW


class FileWriter:
    """Creates and fills new files, one at a time, through one aligned buffer."""

    def __init__(self, *, direct: bool = True, buffer_size: int = BUFFER_SIZE) -> None:
        if buffer_size % ALIGN:
            raise ValueError(f"buffer_size must be a multiple of {ALIGN}")
        self.direct = direct and bool(O_DIRECT)
        self._map = mmap.mmap(-1, buffer_size) if self.direct else None  # page-aligned
        self.direct_bytes = 0  # written past the page cache
        self.cached_bytes = 0  # written through it (tails, small files, fallback)

    def create(self, path: Path) -> OutFile:
        """A new file (it must not exist), opened for writing."""
        if self.direct:
            try:
                fd = os.open(path, _CREATE | O_DIRECT, 0o600)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # Linux creates the file before it refuses the flag: it is ours (O_EXCL).
                if path.is_file() and not path.is_symlink() and path.stat().st_size == 0:
                    path.unlink()
                self.no_direct()
            else:
                return OutFile(self, fd, direct=True)
        return OutFile(self, os.open(path, _CREATE, 0o600), direct=False)

    def no_direct(self) -> None:
        """Ordinary writes from now on (the filesystem refused O_DIRECT)."""
        self.direct = False

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


class OutFile:
    """One file being written: ``write`` its bytes in order, then ``finish``."""

    def __init__(self, owner: FileWriter, fd: int, *, direct: bool) -> None:
        self.owner = owner
        self.fd = fd
        self.direct = direct
        self.buf = memoryview(owner._map) if direct and owner._map is not None else None
        self.fill = 0

    def write(self, data: bytes | memoryview) -> None:
        if self.buf is None:
            self._write_cached(data)
            return
        view = memoryview(data)
        size = len(self.buf)
        off = 0
        while off < len(view):
            n = min(size - self.fill, len(view) - off)
            self.buf[self.fill:self.fill + n] = view[off:off + n]
            self.fill += n
            off += n
            if self.fill == size:
                self._flush(size)

    def finish(self) -> None:
        """Write what the buffer holds (whole blocks direct, the tail cached)."""
        if self.buf is not None:
            aligned = self.fill - self.fill % ALIGN
            if aligned:
                self._flush(aligned)
            if self.fill:
                self._stop_direct()
                self._write_cached(self.buf[:self.fill])
                self.fill = 0
            self.buf.release()
            self.buf = None

    def close(self) -> None:
        if self.buf is not None:
            self.buf.release()
            self.buf = None
        os.close(self.fd)

    def _flush(self, n: int) -> None:
        """Write the buffer's first ``n`` bytes (a multiple of ALIGN) direct."""
        assert self.buf is not None
        done = 0
        while done < n:
            if not self.direct:
                self._write_cached(self.buf[done:n])
                break
            try:
                wrote = os.write(self.fd, self.buf[done:n])
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.owner.no_direct()  # an alignment this filesystem does not take
                self._stop_direct()
                continue
            self.owner.direct_bytes += wrote
            done += wrote
        self.buf[:self.fill - n] = self.buf[n:self.fill]
        self.fill -= n

    def _stop_direct(self) -> None:
        if self.direct:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~O_DIRECT)
            self.direct = False

    def _write_cached(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            self.owner.cached_bytes += n
            view = view[n:]
