"""Where results are written, and how they are made safe before Redis forgets them."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import IO


def open_output(path: str) -> IO[str]:
    """``-``: stdout; anything else: the file, truncated."""
    return sys.stdout if path in ("", "-") else open(path, "w", encoding="utf-8")


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
