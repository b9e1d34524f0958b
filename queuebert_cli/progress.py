"""Progress on stderr for the commands: things done out of a total, with rate and ETA.

One bar for every command that waits on results (``run``, ``results --follow``, and any command
that counts queries or texts classified): it counts what came back, not what was sent, since
that is what the user waits for. The total is often known only roughly at the start (a line
count of the input file) and exactly only once the producer is done, so it can be set late.
Quiet unless stderr is a terminal, so logs and pipes never collect carriage-return noise.
"""

from __future__ import annotations

import os
import sys
import threading
from types import TracebackType
from typing import IO

from tqdm import tqdm

#: Bytes read per step when counting lines: large enough that the count runs at disk speed.
COUNT_CHUNK = 1 << 20


def count_lines(path: str) -> int | None:
    """Lines in the regular file ``path`` (a last line without a newline counts); None for stdin
    (``-``), pipes and anything else that cannot be read twice."""
    if path == "-" or not os.path.isfile(path):
        return None
    lines = 0
    last = b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(COUNT_CHUNK):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")


def estimate_records(path: str, fmt: str) -> int | None:
    """A cheap upper bound on the records in ``path``, for a progress total before reading it.

    One record per line, less a CSV/TSV header. It overcounts blank and unreadable lines and CSV
    fields with quoted newlines; :meth:`Progress.set_total` gives the exact count once it is known.
    """
    lines = count_lines(path)
    if lines is None:
        return None
    return max(0, lines - 1) if fmt in ("csv", "tsv") else lines


class Progress:
    """A tqdm bar of ``unit`` done, on stderr unless ``file`` is given, safe to update from threads.

    ``enabled=None`` shows it only when the stream is a terminal; True forces it on, False off.
    """

    def __init__(self, desc: str = "classified", unit: str = "texts", total: int | None = None, *,
                 enabled: bool | None = None, file: IO[str] | None = None):
        self._lock = threading.Lock()
        self._bar = tqdm(desc=desc, unit=f" {unit}", total=total, file=file if file is not None else sys.stderr,
                         disable=None if enabled is None else not enabled)
        self._total = total  # the bar's, as set here (tqdm types its total as a float)
        self._n = 0  # a disabled tqdm counts nothing

    @property
    def n(self) -> int:
        return self._n

    @property
    def total(self) -> int | None:
        return self._total

    def update(self, n: int = 1) -> None:
        with self._lock:
            self._n += n
            self._bar.update(n)

    def set_total(self, total: int | None) -> None:
        """The exact (or a better) total, once known: rate and ETA follow it from here on."""
        with self._lock:
            if total != self._total:
                self._total = self._bar.total = total
                self._bar.refresh()

    def close(self) -> None:
        with self._lock:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
