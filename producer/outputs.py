"""Where results are written, and how they are made safe before Redis forgets them.

A results file is opened (created if need be) when the command starts, so a path that cannot be
written fails before anything else does, but an existing file is emptied only when the first
result is written to it (:class:`Output`): a command that ends before it has anything to write (a
run already read, a wrong flag, workers that cannot start) leaves the file as it was. Re-running a
finished run used to truncate its results file to nothing, with exit 0.

The lines are written at the path itself, not under a temporary name renamed at the end: a reader
that consumes results (deletes them from Redis once written) and is killed must leave them where
the user looks for them, since that file is then their only copy (see :func:`safe_point`).
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable
from types import TracebackType
from typing import IO


class Output:
    """``-``: stdout; a path: that file, emptied at the first :meth:`write` (not before).

    Used as a context manager: on a normal end a file that got nothing is emptied too (the command
    had no results: the file says so); on an error, a file that got nothing keeps what it had (one
    this created is removed again), and a file that got lines keeps them. A path that is not a
    regular file (``/dev/null``, a FIFO) is written as it is.
    """

    def __init__(self, path: str):
        self.path = path
        self._written = False
        self._regular = False
        self._created = False
        if path in ("", "-"):
            self.stream: IO[str] = sys.stdout
            return
        existed = os.path.exists(path)
        # No O_TRUNC: the file keeps its content until there is something to replace it with.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)  # an OSError names the path
        self._created = not existed
        self._regular = stat.S_ISREG(os.fstat(fd).st_mode)
        self.stream = os.fdopen(fd, "w", encoding="utf-8")

    def write(self, text: str) -> None:
        if not self._written:
            self._start()
        self.stream.write(text)

    def _start(self) -> None:
        self._written = True
        if self._regular:
            os.ftruncate(self.stream.fileno(), 0)  # nothing is buffered yet: the file is exactly what follows

    def safe_point(self) -> Callable[[], None]:
        """:func:`safe_point` of this output (a device or FIFO is only flushed: fsync refuses them)."""
        if self.stream is not sys.stdout and not self._regular:
            return self.stream.flush
        return safe_point(self.stream)

    def close(self, failed: bool = False) -> None:
        """End the output; ``failed``: the command is ending on an error (see the class)."""
        if self.stream is sys.stdout:
            self.stream.flush()
            return
        if failed and not self._written:
            self.stream.close()
            if self._created and self._regular:
                os.unlink(self.path)
            return
        if not self._written:
            self._start()
        self.stream.close()

    def __enter__(self) -> Output:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(failed=exc_type is not None)


def open_output(path: str) -> Output:
    """``-``: stdout; anything else: the file at ``path``, emptied at the first line (see :class:`Output`)."""
    return Output(path)


def safe_point(out: IO[str]) -> Callable[[], None]:
    """What to run before results that were written to ``out`` are deleted from Redis.

    A file is flushed and fsynced: once its results are deleted it is their only copy, and a line
    still in a buffer (or the page cache, on a crash) would be lost. Stdout is only flushed: what
    reads it (a pipe, a terminal) is out of our hands.
    """
    if out is sys.stdout or out is sys.stderr:
        return out.flush

    def flush_and_sync() -> None:
        out.flush()
        os.fsync(out.fileno())

    return flush_and_sync
