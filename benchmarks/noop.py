"""A job function that does nothing: what a stock RQ worker costs per job, with no work at all.

Imported by a stock ``rq worker`` started with ``-P benchmarks`` (so its path is ``noop.noop``).
"""

from __future__ import annotations

from typing import Any


def noop(*args: Any, **kwargs: Any) -> None:
    return None
