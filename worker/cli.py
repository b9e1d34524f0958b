"""``queuebert worker``: load the model once, then run a BatchWorker until stopped."""

from __future__ import annotations

import structlog

from producer.connection import connect
from producer.settings import WorkerSettings

from .model import ModelError

log = structlog.get_logger(__name__)


def run_worker(settings: WorkerSettings) -> int:
    from .batch_worker import BatchWorker
    from .engine import Engine
    from .model import load_model

    connection = connect(settings.redis_url)
    try:
        loaded = load_model(settings.model, revision=settings.revision, device=settings.device,
                            dtype=settings.dtype, trust_remote_code=settings.trust_remote_code)
    except ModelError as exc:
        log.error("cannot start worker", error=str(exc))
        return 2
    engine = Engine(loaded, settings.max_batch_size, settings.max_batch_tokens)
    worker = BatchWorker(settings.queues, connection=connection, settings=settings, engine=engine,
                         name=settings.name)
    worker.work(burst=settings.burst)
    return 0
