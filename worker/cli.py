"""``queuebert worker``: load the model once, then run a BatchWorker until stopped."""

from __future__ import annotations

import structlog

from queuebert.connection import connect
from queuebert.settings import WorkerSettings

from .model import ModelError

log = structlog.get_logger(__name__)


def run_worker(settings: WorkerSettings) -> int:
    from .batch_worker import BatchWorker
    from .tasks import get_engine

    connection = connect(settings.redis_url, replica_acks=settings.replica_acks,
                         replica_ack_timeout_ms=settings.replica_ack_timeout_ms)
    try:
        engine = get_engine(settings)  # the same loader the stock-RQ path uses
    except ModelError as exc:
        log.error("cannot start worker", error=str(exc))
        return 2
    worker = BatchWorker(settings.queues, connection=connection, settings=settings, engine=engine,
                         name=settings.name)
    worker.work(burst=settings.burst)
    # Non-zero when a thread died of a bug, so `--devices` and container restarts bring it back.
    return 1 if worker.fatal is not None else 0
