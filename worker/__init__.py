"""queuebert's worker side: the batching RQ worker, the engine and the model loader.

``rq worker -w worker.BatchWorker`` imports the class from here; it is loaded lazily so that
importing ``worker.tasks`` (what a stock RQ worker does per job) stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BatchWorker"]


def __getattr__(name: str) -> Any:
    if name == "BatchWorker":
        from .batch_worker import BatchWorker

        return BatchWorker
    raise AttributeError(name)
