"""Run blocking pgkloset_core work from a Dagster op: logs streamed, termination forwarded.

The work runs in a worker thread; the op's thread drains its log lines into
the run's log and waits. When Dagster terminates the run it interrupts the
op's thread: we set the ``cancel`` event, which kills the dump tool, wait for
the worker to unwind (nothing is committed) and re-raise.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import dagster as dg

from pgkloset_core.errors import KlosetError

T = TypeVar("T")
Log = Callable[[str], None]
_DONE = object()
CANCEL_WAIT_SECONDS = 120.0


def run_cancellable(context: Any, what: str, work: Callable[[Log, threading.Event], T]) -> T:
    """Call ``work(log, cancel)`` in a thread; KlosetError becomes one clear dagster.Failure."""
    lines: queue.Queue[object] = queue.Queue()
    cancel = threading.Event()
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(work(lines.put, cancel))
        except BaseException as exc:  # handed to the op's thread
            error.append(exc)
        finally:
            lines.put(_DONE)

    worker = threading.Thread(target=target, name=f"pgkloset-{what}", daemon=True)
    worker.start()
    try:
        _drain(context, what, lines)
    except BaseException:
        cancel.set()
        context.log.warning(f"{what}: run interrupted; stopping the tool, nothing is committed")
        worker.join(CANCEL_WAIT_SECONDS)
        _flush(context, what, lines)
        raise
    worker.join()
    if error:
        exc = error[0]
        if isinstance(exc, KlosetError):
            raise dg.Failure(description=f"{what}: {exc}", allow_retries=False) from None
        raise exc
    return result[0]


def _drain(context: Any, what: str, lines: queue.Queue[object]) -> None:
    while True:
        try:
            item = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if item is _DONE:
            return
        context.log.info(f"{what}: {item}")


def _flush(context: Any, what: str, lines: queue.Queue[object]) -> None:
    while True:
        try:
            item = lines.get_nowait()
        except queue.Empty:
            return
        if item is not _DONE:
            context.log.info(f"{what}: {item}")
